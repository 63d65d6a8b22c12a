"""Tasks with checkable answers: verifiers, vocab.json, tokenizers and the synthetic task.

The verifiers and the synthetic generator are the C++ ones the trainer uses (csrc/tasks), so a
reward computed here equals the trainer's::

    reward("gsm8k", "... #### 1,234", "1234")          # 1.0
    ex = make_example(seed=3, length=1024)              # {"prompt", "response", "answer"}
    reward("exact", ex["response"], ex["answer"])       # 1.0

Data files (see csrc/tasks/tasks.h): ``<name>.jsonl`` of token ids plus ``vocab.json`` beside it,
which maps each token id to its bytes so that C++ can read what a model wrote.
"""
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from ._C import Tokenizer as _Llama2Tokenizer
from ._C import tasks as _tasks
from ._checks import check_seed

Vocab = _tasks.Vocab
SyntheticOptions = _tasks.SyntheticOptions

ANSWER_KINDS = ("gsm8k", "boxed", "exact")
# The character tokenizer's tokens in id order (specials first): every character the synthetic
# task writes is one token.
CHAR_VOCABULARY: List[str] = list(_tasks.char_vocabulary())
SYNTHETIC_FIELDS = ("num_variables", "chain_depth", "modulus")
CHAR_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>",
                       "unk_token": "<unk>"}

__all__ = ["ANSWER_KINDS", "CHAR_VOCABULARY", "Vocab", "SyntheticOptions", "Problem",
           "extract_answer", "reward", "synthetic_options", "make_example", "char_token_ids",
           "save_char_tokenizer", "load_tokenizer", "token_bytes", "write_vocab", "shared_dir",
           "read_problems", "read_stories"]


def extract_answer(kind: str, response: str) -> str:
    """The answer ``response`` states ("" when none): ``kind`` 'gsm8k' (the number after the
    last "####"), 'boxed' (the last \\boxed{...}) or 'exact' (the rest of the line after the
    last "Answer:")."""
    return _tasks.extract_answer(kind, response)


def reward(kind: str, response: str, reference: str) -> float:
    """1.0 when the answer ``response`` states matches ``reference`` (numerically for gsm8k and
    numeric boxed answers), else 0.0."""
    return _tasks.reward(kind, response, reference)


def synthetic_options(length: Optional[int] = None, **fields) -> SyntheticOptions:
    """Options of the synthetic task: those for examples of about ``length`` characters (= tokens
    with the character tokenizer; 64..65536) when given, else the defaults; ``fields``
    (num_variables, chain_depth, modulus) override either."""
    options = (_tasks.synthetic_options_for_length(length) if length is not None
               else SyntheticOptions())
    for name, value in fields.items():
        if name not in SYNTHETIC_FIELDS:
            raise ValueError(f"unknown synthetic option {name!r}; one of "
                             f"{', '.join(SYNTHETIC_FIELDS)}")
        setattr(options, name, value)
    options.validate()
    return options


def make_example(seed: int, options: Optional[SyntheticOptions] = None,
                 length: Optional[int] = None) -> Dict[str, str]:
    """One synthetic example, {"prompt", "response", "answer"}, the same for the same seed and
    options everywhere. The prompt defines variables in shuffled order and asks for one; the
    response looks up its chain of definitions, evaluates it and ends in "Answer: <value>"
    (checked with ``reward("exact", ...)``). ``options`` or ``length`` (see synthetic_options)."""
    if options is not None and length is not None:
        raise ValueError("make_example: give options or length, not both")
    if options is None:
        options = synthetic_options(length)
    return _tasks.make_synthetic_example(options, check_seed(seed))


def char_token_ids(text: str) -> List[int]:
    """The character tokenizer's ids of ``text``, one per character, no special tokens (the C++
    encoder the trainer uses; ValueError on a character outside CHAR_VOCABULARY)."""
    return _tasks.char_token_ids(text)


def save_char_tokenizer(directory: Union[str, PathLike]) -> Path:
    """Writes the synthetic task's character tokenizer (tokenizer.json + tokenizer_config.json)
    so that ``transformers.AutoTokenizer.from_pretrained(directory)`` loads it. Encoding puts
    <bos> first; decoding concatenates the characters."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(CHAR_VOCABULARY)},
                              unk_token=CHAR_SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    bos = CHAR_SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, CHAR_VOCABULARY.index(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **CHAR_SPECIAL_TOKENS)
    directory = Path(directory)
    fast.save_pretrained(str(directory))
    return directory


# ---- the real data sets (shared/data, see DATA.md) ------------------------------------------

def shared_dir() -> Path:
    """The real data: $GKV_SHARED_DIR, else shared/ inside the checkout, else beside it."""
    if os.environ.get("GKV_SHARED_DIR"):
        return Path(os.environ["GKV_SHARED_DIR"])
    root = Path(__file__).resolve().parents[1]
    return root / "shared" if (root / "shared").is_dir() else root.parent / "shared"


def shared_file(relative: str) -> Path:
    path = shared_dir() / relative
    if not path.is_file():
        raise ValueError(f"{path} not found (set GKV_SHARED_DIR to the shared data folder)")
    return path


@dataclass
class Problem:
    question: str
    solution: str     # the worked solution, ending in the answer ("#### N" or \boxed{...})
    answer: str       # the bare reference answer
    answer_kind: str


# name -> (file under shared/, its splits, answer kind)
PROBLEM_SETS = {"gsm8k": ("data/gsm8k/{split}.jsonl", ("train", "test"), "gsm8k"),
                "math500": ("data/math500/test.jsonl", ("test",), "boxed")}
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<16-3-4=9>>" annotations


def read_problems(name: str, split: str = "test") -> List[Problem]:
    """GSM8K (train, test) or MATH-500 (test) problems with their reference answers; problems
    whose solution states no answer are left out. GSM8K's calculator annotations are dropped
    from the solutions."""
    if name not in PROBLEM_SETS:
        raise ValueError(f"unknown problem set {name!r}; one of {', '.join(PROBLEM_SETS)}")
    pattern, splits, kind = PROBLEM_SETS[name]
    if split not in splits:
        raise ValueError(f"{name} has splits {', '.join(splits)}, not {split!r}")
    out = []
    with open(shared_file(pattern.format(split=split)), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            solution = _CALCULATOR_NOTE.sub("", row["answer"])
            answer = extract_answer(kind, solution)
            if answer:
                out.append(Problem(row["question"], solution, answer, kind))
    return out


def read_stories() -> List[str]:
    """The TinyStories validation stories (separated by lines <|endoftext|> in the file)."""
    text = shared_file("data/tinystories/valid-160k.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]


# ---- tokenizers: one interface over transformers' and the llama2.c one ----------------------

class Llama2Tokenizer:
    """The llama2.c tokenizer of a llama2.ts model (tok512.bin beside it, else the model file's own
    vocabulary)."""

    def __init__(self, model_path: Union[str, PathLike]):
        model_path = Path(model_path)
        tok = model_path.parent / "tok512.bin"
        self.tok = _Llama2Tokenizer.load(str(tok if tok.exists() else model_path))
        self.eos_token_id = _Llama2Tokenizer.eos_id
        self.vocab_size = self.tok.vocab_size

    def encode(self, text: str, special: bool = True) -> List[int]:
        """``special``: a BOS first (and the dummy-prefix space, as llama2.c does)."""
        return self.tok.encode(text, bos=special)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def token_bytes(self) -> List[bytes]:
        """unk, bos and eos (ids 0..2) have no text; a prompt decodes with the dummy-prefix
        space that encoding put first."""
        return [b"" if i <= self.eos_token_id else _piece_bytes(self.tok.piece(i))
                for i in range(self.vocab_size)]


class HFTokenizer:
    """transformers' AutoTokenizer of a checkpoint or tokenizer directory."""

    def __init__(self, directory: Union[str, PathLike], chat_template: bool = False):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(str(directory))
        self.chat_template = chat_template
        if chat_template and not getattr(self.tok, "chat_template", None):
            raise ValueError(f"tokenizer {directory} has no chat template (chat_template=True)")
        self.eos_token_id = self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str, special: bool = True) -> List[int]:
        """A prompt (``special``: BOS and the like, or the chat template as a user turn) or a
        continuation (``special=False``: the text's tokens only)."""
        if special and self.chat_template:
            return list(self.tok.apply_chat_template([{"role": "user", "content": text}],
                                                     tokenize=True, add_generation_prompt=True,
                                                     return_dict=False))
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self) -> List[bytes]:
        backend = json.loads(self.tok.backend_tokenizer.to_str())
        byte_level = (backend.get("decoder") or {}).get("type") == "ByteLevel"
        added = {i for i in self.tok.added_tokens_decoder}
        unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        out = []
        for i, token in enumerate(self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))):
            if token is None:
                out.append(b"")
            elif i in added:
                out.append(token.encode())
            elif byte_level:
                out.append(bytes(unicode_to_byte[c] for c in token))
            else:
                out.append(_piece_bytes(token))
        return out


Tokenizer = Union[Llama2Tokenizer, HFTokenizer]


def load_tokenizer(path: Union[str, PathLike], chat_template: bool = False) -> Tokenizer:
    """The tokenizer for ``path``: a llama2.ts .bin file's llama2.c tokenizer, or the
    transformers tokenizer of a directory that has one, or of its ``tokenizer/`` subdirectory
    (where the bundled model keeps its character tokenizer: beside a Qwen2 config.json,
    transformers would load it as a Qwen2Tokenizer, which drops newlines)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist (a model directory or a llama2.ts .bin file)")
    if path.is_file():
        if chat_template:
            raise ValueError(f"{path}: a llama2.c tokenizer has no chat template")
        return Llama2Tokenizer(path)
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    for directory in (path, path / "tokenizer"):
        if any((directory / f).exists() for f in files):
            return HFTokenizer(directory, chat_template=chat_template)
    raise ValueError(f"no tokenizer found in {path} or {path / 'tokenizer'} (tokenizer.json or "
                     "tokenizer_config.json), and it is not a llama2.ts .bin file")


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_bytes(piece: str) -> bytes:
    """A sentencepiece-style piece's bytes: "<0x0A>" is a byte, U+2581 a space."""
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are moved
    to code points from 256 on."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def token_bytes(tokenizer: Tokenizer) -> List[bytes]:
    """Each token id's bytes (special tokens: their text; llama2.c's unk/bos/eos: none)."""
    return tokenizer.token_bytes()


def write_vocab(path: Union[str, PathLike], tokens: Sequence[bytes]) -> Path:
    """Writes vocab.json: {"tokens": [hex of each token's bytes]}."""
    path = Path(path)
    path.write_text(json.dumps({"tokens": [bytes(t).hex() for t in tokens]}))
    return path
