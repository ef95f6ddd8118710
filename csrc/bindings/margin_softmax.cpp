// Bindings of the margin_softmax epilogues (CPU and, with SIMCORE_WITH_CUDA, CUDA).
//
// One Python name per kernel; the device of the first tensor picks the CPU or
// CUDA implementation (run_on_device), which re-checks every argument (devices
// included). The last argument `exec` is the OpenMP thread count for CPU tensors
// and torch's current stream handle for CUDA tensors
// (simcore/margin/functional.py:_exec).
#include "bindings/ops.h"
#include "bindings/run_on_device.h"
#include "bindings/tensor_arg.h"
#include "cpu/margin_softmax.h"

#ifdef SIMCORE_WITH_CUDA
#include "cuda/margin_softmax.h"
#endif

namespace py = pybind11;

namespace simcore {
namespace {

// (m1, m2, m3, scale, sin_eps, cam_power, filter_threshold, curricular, curricular_t):
// simcore/margin/functional.py:MarginSpec.kernel_params builds it.
MarginParams params(const py::handle& obj) {
  if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 9)
    throw TypeError("params must be a tuple of 9 numbers (m1, m2, m3, scale, sin_eps, cam_power, "
                    "filter_threshold, curricular, curricular_t)");
  const py::tuple t = py::reinterpret_borrow<py::tuple>(obj);
  double v[9];
  for (int k = 0; k < 9; ++k) {
    if (!py::isinstance<py::float_>(t[k]) && !py::isinstance<py::int_>(t[k]))
      throw TypeError(detail::concat("params[", k, "] must be a number"));
    v[k] = t[k].cast<double>();
  }
  MarginParams p;
  p.m1 = v[0];
  p.m2 = v[1];
  p.m3 = v[2];
  p.scale = v[3];
  p.sin_eps = v[4];
  p.cam_power = v[5];
  p.filter_threshold = v[6];
  SIMCORE_CHECK(v[7] == 0.0 || v[7] == 1.0, "params[7] (curricular) must be 0 or 1, got ", v[7]);
  p.curricular = v[7] == 1.0;
  p.curricular_t = v[8];
  check_margin_params(p);
  return p;
}

// One function per Python name: unpack (checking every tensor), then run.
void normalize_rows(py::handle src_, py::handle index_, py::handle out_, py::handle norms_, double eps,
                    int64_t exec) {
  const TensorView src = tensor_from_py(src_, "src");
  const auto index = optional_tensor(index_, "index");
  const TensorView out = tensor_from_py(out_, "out");
  const TensorView norms = tensor_from_py(norms_, "norms");
  run_on_device(SIMCORE_KERNEL(normalize_rows), src, exec_args(exec), src, ptr(index), out, norms, eps);
}

void targets(py::handle labels_, py::handle sampled_, int64_t num_classes, py::handle out_, int64_t exec) {
  const TensorView labels = tensor_from_py(labels_, "labels");
  const TensorView sampled = tensor_from_py(sampled_, "sampled");
  const TensorView out = tensor_from_py(out_, "out");
  run_on_device(SIMCORE_KERNEL(targets), labels, exec_args(exec), labels, sampled, num_classes, out);
}

void lse_block(py::handle cos_, py::handle target_col_, int64_t col0, py::handle params_, py::handle row_margins_,
               py::handle run_max_, py::handle run_sum_, py::handle target_cos_, py::handle target_logit_,
               int64_t exec, py::handle dyn_) {
  const TensorView cos = tensor_from_py(cos_, "cos");
  const auto dyn = optional_tensor(dyn_, "dyn");
  const TensorView target_col = tensor_from_py(target_col_, "target_col");
  const auto row_margins = optional_tensor(row_margins_, "row_margins");
  const TensorView run_max = tensor_from_py(run_max_, "run_max");
  const TensorView run_sum = tensor_from_py(run_sum_, "run_sum");
  const TensorView target_cos = tensor_from_py(target_cos_, "target_cos");
  const TensorView target_logit = tensor_from_py(target_logit_, "target_logit");
  const MarginParams p = params(params_);
  run_on_device(SIMCORE_KERNEL(lse_block), cos, exec_args(exec), cos, target_col, col0, p, ptr(dyn),
                ptr(row_margins), run_max, run_sum, target_cos, target_logit);
}

void grad_block(py::handle cos_, py::handle target_col_, int64_t col0, py::handle params_, py::handle row_margins_,
                py::handle lse_, py::handle row_weight_, py::handle target_cos_, int64_t exec, py::handle dyn_) {
  const TensorView cos = tensor_from_py(cos_, "cos");
  const auto dyn = optional_tensor(dyn_, "dyn");
  const TensorView target_col = tensor_from_py(target_col_, "target_col");
  const auto row_margins = optional_tensor(row_margins_, "row_margins");
  const TensorView lse = tensor_from_py(lse_, "lse");
  const TensorView row_weight = tensor_from_py(row_weight_, "row_weight");
  const TensorView target_cos = tensor_from_py(target_cos_, "target_cos");
  const MarginParams p = params(params_);
  run_on_device(SIMCORE_KERNEL(grad_block), cos, exec_args(exec), cos, target_col, col0, p, ptr(dyn),
                ptr(row_margins), lse, row_weight, target_cos);
}

void subcenter_max(py::handle cos_k_, int64_t k, py::handle out_, py::handle argmax_, int64_t exec) {
  const TensorView cos_k = tensor_from_py(cos_k_, "cos_k");
  const TensorView out = tensor_from_py(out_, "out");
  const TensorView argmax = tensor_from_py(argmax_, "argmax");
  run_on_device(SIMCORE_KERNEL(subcenter_max), cos_k, exec_args(exec), cos_k, k, out, argmax);
}

void subcenter_expand(py::handle grad_, py::handle argmax_, int64_t k, py::handle out_, int64_t exec) {
  const TensorView grad = tensor_from_py(grad_, "grad");
  const TensorView argmax = tensor_from_py(argmax_, "argmax");
  const TensorView out = tensor_from_py(out_, "out");
  run_on_device(SIMCORE_KERNEL(subcenter_expand), grad, exec_args(exec), grad, argmax, k, out);
}

void project_rows(py::handle u_, py::handle v_, py::handle norms_, py::handle out_, py::handle out_index_,
                  double eps, int64_t exec) {
  const TensorView u = tensor_from_py(u_, "u");
  const TensorView v = tensor_from_py(v_, "v");
  const TensorView norms = tensor_from_py(norms_, "norms");
  const TensorView out = tensor_from_py(out_, "out");
  const auto out_index = optional_tensor(out_index_, "out_index");
  run_on_device(SIMCORE_KERNEL(project_rows), u, exec_args(exec), u, v, norms, out, ptr(out_index), eps);
}

// Host only: the sampled class ids are needed on the host anyway.
void sample_classes(py::handle positives_, py::handle randoms_, int64_t num_classes, py::handle bitmap_,
                    py::handle out_) {
  const TensorView positives = tensor_from_py(positives_, "positives");
  const TensorView randoms = tensor_from_py(randoms_, "randoms");
  const TensorView bitmap = tensor_from_py(bitmap_, "bitmap");
  const TensorView out = tensor_from_py(out_, "out");
  py::gil_scoped_release release;
  cpu::sample_classes(positives, randoms, num_classes, bitmap, out);
}

}  // namespace

void bind_margin_softmax(py::module_& m) {
  m.def("ms_normalize_rows", &normalize_rows,
        "out[r] = src[index[r]] / max(‖src[index[r]]‖, eps) in out's dtype; norms[r] = ‖src[index[r]]‖",
        py::arg("src"), py::arg("index"), py::arg("out"), py::arg("norms"), py::arg("eps"), py::arg("exec"));
  m.def("ms_targets", &targets,
        "out[i] = position of labels[i] in the sorted sampled class ids (labels range-checked)", py::arg("labels"),
        py::arg("sampled"), py::arg("num_classes"), py::arg("out"), py::arg("exec"));
  // dyn: optional float64 (cam_power, curricular_t), NaN where params' own value applies
  // (simcore/margin/engine.py:split_dynamic); read where it lives (no host read on CUDA)
  m.def("ms_lse_block", &lse_block,
        "margin on the target column, then merge the block's log-sum-exp into (run_max, run_sum); "
        "dyn: optional float64 (cam_power, curricular_t) replacing params' values where not NaN",
        py::arg("cos"), py::arg("target_col"), py::arg("col0"), py::arg("params"), py::arg("row_margins"),
        py::arg("run_max"), py::arg("run_sum"), py::arg("target_cos"), py::arg("target_logit"), py::arg("exec"),
        py::arg("dyn") = py::none());
  m.def("ms_grad_block", &grad_block,
        "in place: cos -> row_weight·(softmax − one-hot)·dlogit/dcos (dψ/dcos·s on the target column); "
        "dyn: as ms_lse_block's",
        py::arg("cos"), py::arg("target_col"), py::arg("col0"), py::arg("params"), py::arg("row_margins"),
        py::arg("lse"), py::arg("row_weight"), py::arg("target_cos"), py::arg("exec"), py::arg("dyn") = py::none());
  m.def("ms_subcenter_max", &subcenter_max,
        "out[i, j] = max_k cos_k[i, j*K + k]; argmax[i, j] = the first k attaining it");
  m.def("ms_subcenter_expand", &subcenter_expand, "out[i, j*K + argmax[i, j]] = grad[i, j], 0 elsewhere");
  m.def("ms_project_rows", &project_rows,
        "out[out_index[r]] = (u_r − (u_r·v_r) v_r) / norms[r] (u/eps where norms[r] <= eps)");
  m.def("ms_sample_classes", &sample_classes,
        "host: sorted positives + a uniform k-subset of the other classes (k = len(randoms))");
}

}  // namespace simcore
