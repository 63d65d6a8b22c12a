"""The verifiers, vocab.json and the synthetic task from Python (gkv_ext.tasks), and the
character tokenizer through transformers' AutoTokenizer."""
import re

import pytest

from gkv_ext import tasks

LENGTHS = [256, 512, 1024, 2048, 4096]
DEFINITION = re.compile(r"([a-z]+)=(?:(\d+)|([a-z]+)([+-])(\d+))")


def evaluate_system(prompt: str, modulus: int) -> str:
    """The asked variable's value, from the prompt alone: parse every definition, then resolve
    the asked one recursively (independent of the generator's own bookkeeping)."""
    *lines, question = prompt.rstrip("\n").split("\n")
    defs = {}
    for line in lines:
        m = DEFINITION.fullmatch(line)
        assert m, f"not a definition: {line!r}"
        assert m.group(1) not in defs, f"{m.group(1)} defined twice"
        defs[m.group(1)] = m.groups()[1:]

    def value(name, depth=0):
        assert depth <= len(defs), "cycle"
        constant, source, op, offset = defs[name]
        if constant is not None:
            return int(constant)
        base = value(source, depth + 1)
        return (base + int(offset) if op == "+" else base - int(offset)) % modulus

    assert question.endswith("?")
    return str(value(question[:-1]))


@pytest.mark.parametrize("modulus", [10, 97])
def test_synthetic_answers_are_right(modulus):
    options = tasks.synthetic_options(num_variables=60, chain_depth=12, modulus=modulus)
    for seed in range(20):
        ex = tasks.make_example(seed, options)
        assert evaluate_system(ex["prompt"], modulus) == ex["answer"]
        assert ex["response"].endswith("Answer: " + ex["answer"])
        assert tasks.reward("exact", ex["response"], ex["answer"]) == 1.0
        wrong = str((int(ex["answer"]) + 1) % modulus)
        assert tasks.reward("exact", ex["response"], wrong) == 0.0


def test_synthetic_is_deterministic_and_seeded():
    a, b, c = (tasks.make_example(s, length=1024) for s in (5, 5, 6))
    assert a == b
    assert a["prompt"] != c["prompt"]


@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_synthetic_lookups_reach_far_back(length):
    """Each lookup line of the response copies a prompt definition; most of them lie more than
    length/4 characters (= tokens) before the point where they are copied, out of sight of a
    StreamingLLM cache of budget length/4 (measured: about 75%)."""
    distances = []
    for seed in range(20):
        ex = tasks.make_example(seed, length=length)
        position = len(ex["prompt"])
        for line in ex["response"].split("\n"):
            if DEFINITION.fullmatch(line):
                start = ("\n" + ex["prompt"]).index("\n" + line + "\n")  # a whole prompt line
                distances.append(position - start)
            position += len(line) + 1
    assert len(distances) == 20 * tasks.synthetic_options(length).chain_depth
    assert sum(d > length / 4 for d in distances) / len(distances) > 0.6


@pytest.mark.parametrize("length", LENGTHS)
def test_synthetic_length_knob(length, char_tokenizer):
    for seed in range(3):
        ex = tasks.make_example(seed, length=length)
        ids = char_tokenizer(ex["prompt"] + ex["response"], add_special_tokens=False)["input_ids"]
        assert 0.85 * length < len(ids) < 1.15 * length


def test_synthetic_option_errors():
    with pytest.raises(ValueError, match="chain_depth must be in"):
        tasks.synthetic_options(chain_depth=0)
    with pytest.raises(ValueError, match="unknown synthetic option 'depth'"):
        tasks.synthetic_options(depth=3)
    with pytest.raises(ValueError, match="options or length"):
        tasks.make_example(0, tasks.synthetic_options(), length=512)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\), got -1"):
        tasks.make_example(-1)
    assert tasks.make_example(2**64 - 1)["answer"]  # the largest seed is one
    with pytest.raises(ValueError, match="byte 66 at offset 2"):
        tasks.char_token_ids("a=B")


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    directory = tasks.save_char_tokenizer(tmp_path_factory.mktemp("char_tok"))
    return AutoTokenizer.from_pretrained(str(directory))


def test_char_tokenizer_round_trip(char_tokenizer):
    ex = tasks.make_example(1, length=512)
    text = ex["prompt"] + ex["response"]
    ids = char_tokenizer(text)["input_ids"]
    assert ids[0] == char_tokenizer.bos_token_id == tasks.CHAR_VOCABULARY.index("<bos>")
    assert ids[1:] == [tasks.CHAR_VOCABULARY.index(c) for c in text]  # one token per character
    assert ids[1:] == tasks.char_token_ids(text)  # the C++ encoder agrees
    assert char_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert char_tokenizer.eos_token_id == tasks.CHAR_VOCABULARY.index("<eos>")
    assert char_tokenizer.pad_token_id == tasks.CHAR_VOCABULARY.index("<pad>")


def test_verifiers():
    assert tasks.extract_answer("gsm8k", "so\n#### 1,234") == "1234"
    assert tasks.reward("gsm8k", "#### 72.0", "72") == 1.0
    assert tasks.reward("boxed", r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}") == 1.0
    assert tasks.reward("boxed", r"\boxed{1} then \boxed{2}", "1") == 0.0
    with pytest.raises(ValueError, match="gsm8k, boxed, exact"):
        tasks.reward("math", "", "")


def test_vocab_round_trip(tmp_path):
    tokens = [b"", b"a", b"\xe2\x82", b"\xac", b" b"]
    path = tasks.write_vocab(tmp_path / "vocab.json", tokens)
    vocab = tasks.Vocab.load(str(path))
    assert len(vocab) == 5
    assert vocab.decode([1, 2, 3, 4, 0]).decode() == "a\u20ac b"
    with pytest.raises(IndexError, match="token id 5 outside"):
        vocab.decode([5])
    (tmp_path / "bad.json").write_text('{"tokens": ["zz"]}')
    with pytest.raises(RuntimeError, match="bad.json.*tokens\\[0\\]"):
        tasks.Vocab.load(str(tmp_path / "bad.json"))
