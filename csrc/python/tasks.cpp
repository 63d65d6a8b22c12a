// Python bindings of the verifiers, the vocab.json reader and the synthetic task
// (gkv_ext._C.tasks; gkv_ext/tasks.py wraps them). Bindings only bind: the logic lives in
// csrc/tasks/.
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>
#include <torch/extension.h>

#include "tasks/synthetic.h"
#include "tasks/tasks.h"

namespace py = pybind11;
using namespace gkv::tasks;

#pragma GCC diagnostic ignored "-Wattributes"  // see csrc/python/model.cpp

void bind_tasks(py::module& parent) {
  auto m = parent.def_submodule("tasks", "Verifiers, vocab.json and the synthetic task (csrc/tasks).");
  // Answer kinds travel as their names ("gsm8k", "boxed", "exact").
  m.def("extract_answer",
        [](const std::string& kind, const std::string& response) {
          return extract_answer(answer_kind_from_string(kind), response);
        },
        py::arg("kind"), py::arg("response"));
  m.def("reward",
        [](const std::string& kind, const std::string& response, const std::string& reference) {
          return reward(answer_kind_from_string(kind), response, reference);
        },
        py::arg("kind"), py::arg("response"), py::arg("reference"));

  py::class_<Vocab>(m, "Vocab", "Token id -> bytes, from vocab.json.")
      .def_static("load", &Vocab::load, py::arg("path"))
      .def(py::init([](const std::vector<py::bytes>& tokens) {
             return Vocab(std::vector<std::string>(tokens.begin(), tokens.end()));
           }),
           py::arg("tokens"))
      .def_property_readonly("size", &Vocab::size)
      .def("__len__", &Vocab::size)
      .def("decode",
           [](const Vocab& v, const std::vector<int64_t>& ids, int64_t padded_size) {
             return py::bytes(v.decode(ids, padded_size));
           },
           py::arg("ids"), py::arg("padded_size") = 0,
           "The concatenated bytes of the ids; ids in [size, padded_size) (a model's padding rows) "
           "have no text.");

  namespace syn = synthetic;
  py::class_<syn::Options>(m, "SyntheticOptions", "Knobs of the synthetic task (csrc/tasks/synthetic.h).")
      .def(py::init<>())
      .def_readwrite("num_variables", &syn::Options::num_variables)
      .def_readwrite("chain_depth", &syn::Options::chain_depth)
      .def_readwrite("modulus", &syn::Options::modulus)
      .def("validate", &syn::Options::validate)
      .def("__repr__", [](const syn::Options& o) {
        return "SyntheticOptions(num_variables=" + std::to_string(o.num_variables) +
               ", chain_depth=" + std::to_string(o.chain_depth) + ", modulus=" + std::to_string(o.modulus) + ")";
      });
  m.def("synthetic_options_for_length", &syn::options_for_length, py::arg("tokens"));
  m.def("make_synthetic_example",
        [](const syn::Options& options, uint64_t seed) {
          const auto ex = syn::make_example(options, seed);
          py::dict out;
          out["prompt"] = ex.prompt;
          out["response"] = ex.response;
          out["answer"] = ex.answer;
          return out;
        },
        py::arg("options"), py::arg("seed"));
  m.def("char_vocabulary", &syn::char_vocabulary);
  m.def("char_token_ids", &syn::char_token_ids, py::arg("text"));
}
