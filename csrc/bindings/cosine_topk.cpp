// Bindings of the cosine_topk kernels (CPU and, with SIMCORE_WITH_CUDA, CUDA).
// Arguments are read while holding the GIL; the kernels run without it.
#include "bindings/ops.h"
#include "bindings/run_on_device.h"
#include "bindings/tensor_arg.h"
#include "cpu/cosine_topk.h"

#ifdef SIMCORE_WITH_CUDA
#include "cuda/cosine_topk.cuh"
#endif

namespace py = pybind11;

namespace simcore {

namespace {

void prepare_block(const py::handle& block, const py::handle& scale, const py::handle& slack,
                   const py::handle& status, int64_t row_base, bool cosine, double slack_factor, int num_threads,
                   uint64_t stream, const py::handle& converted) {
  TopkPrepareArgs a;
  const auto conv = optional_tensor(converted, "converted");
  a.convert = conv.has_value();
  if (a.convert) a.converted = *conv;
  a.block = tensor_from_py(block, "block");
  a.scale = tensor_from_py(scale, "scale");
  a.slack = tensor_from_py(slack, "slack");
  a.status = tensor_from_py(status, "status");
  a.row_base = row_base;
  a.cosine = cosine;
  a.slack_factor = slack_factor;
  run_on_device(SIMCORE_KERNEL(cosine_topk_prepare_block), a.block, ExecArgs{"num_threads", num_threads, stream}, a);
}

void update_tile(const py::handle& scores, const py::handle& scale, const py::handle& slack,
                 const py::handle& queries, const py::handle& query_slack, const py::handle& block,
                 const py::handle& excl_offsets, const py::handle& excl_index, const py::handle& reservoir,
                 const py::handle& count, const py::handle& threshold, int64_t q_begin, int64_t db_base, int64_t k,
                 int64_t n_total, bool rescore, int num_threads, uint64_t stream, double slack_rel,
                 const py::handle& workspace) {
  TopkUpdateArgs a;
  const auto ws = optional_tensor(workspace, "workspace");
  a.has_workspace = ws.has_value();
  if (a.has_workspace) a.workspace = *ws;
  a.scores = tensor_from_py(scores, "scores");
  a.scale = tensor_from_py(scale, "scale");
  a.slack = tensor_from_py(slack, "slack");
  a.queries = tensor_from_py(queries, "queries");
  a.query_slack = tensor_from_py(query_slack, "query_slack");
  a.block = tensor_from_py(block, "block");
  a.excl_offsets = tensor_from_py(excl_offsets, "exclude_offsets");
  a.excl_index = tensor_from_py(excl_index, "exclude_index");
  a.reservoir = tensor_from_py(reservoir, "reservoir");
  a.count = tensor_from_py(count, "count");
  a.threshold = tensor_from_py(threshold, "threshold");
  a.q_begin = q_begin;
  a.db_base = db_base;
  a.k = k;
  a.n_total = n_total;
  a.rescore = rescore;
  a.slack_rel = slack_rel;
  run_on_device(SIMCORE_KERNEL(cosine_topk_update), a.scores, ExecArgs{"num_threads", num_threads, stream}, a);
}

}  // namespace

void bind_cosine_topk(py::module_& m) {
  m.def("cosine_topk_prepare_block", &prepare_block,
        py::arg("block"), py::arg("scale"), py::arg("slack"), py::arg("status"), py::arg("row_base"),
        py::arg("cosine"), py::arg("slack_factor"), py::arg("num_threads"), py::arg("stream") = 0,
        py::arg("converted") = py::none(),
        "Per database block: scale_j (1/||d_j|| or 1), slack_j, the first non-finite row into status and, "
        "when `converted` is given, the block rounded to bfloat16.");

  m.def("cosine_topk_update", &update_tile,
        py::arg("scores"), py::arg("scale"), py::arg("slack"), py::arg("queries"), py::arg("query_slack"),
        py::arg("block"), py::arg("exclude_offsets"), py::arg("exclude_index"), py::arg("reservoir"),
        py::arg("count"), py::arg("threshold"), py::arg("q_begin"), py::arg("db_base"), py::arg("k"),
        py::arg("n_total"), py::arg("rescore"), py::arg("num_threads"), py::arg("stream") = 0,
        py::arg("slack_rel") = 0.0, py::arg("workspace") = py::none(),
        "Per tile: threshold scan (+ exact rescoring), exclusion, merge into the running top-k reservoirs. "
        "`workspace` (CUDA, optional): float32 scratch of topk_split_workspace(qb, nb) elements for tiles of "
        "at most COSINE_TOPK_SPLIT_MAX_ROWS query rows, scanned by (row, segment) blocks.");

  m.def("cpu_has_fast_bf16", &cpu::has_fast_bf16,
        "True when the CPU has AVX-512 BF16 (cosine_topk nominates float32 candidates with bfloat16 GEMMs).");
  m.attr("COSINE_TOPK_MIN_SLACK") = kTopkMinSlack;  // CUDA; the CPU needs 1
  m.attr("COSINE_TOPK_SPLIT_MAX_ROWS") = kTopkSplitMaxRows;  // CUDA small tiles
  m.def("cosine_topk_split_workspace", &topk_split_workspace, py::arg("qb"), py::arg("nb"),
        "float32 elements of cosine_topk_update's workspace for a (qb x nb) CUDA tile");
}

}  // namespace simcore
