// The Python module simcore._C: error translation, build facts, and the ops.
#include <pybind11/pybind11.h>

#include "bindings/ops.h"
#include "bindings/tensor_arg.h"
#include "common/tensor_view.h"
#include "cpu/huge_pages.h"

#ifdef SIMCORE_WITH_CUDA
#include "cuda/runtime.h"
#endif

namespace py = pybind11;

#ifndef SIMCORE_MODULE_NAME
#define SIMCORE_MODULE_NAME _C
#endif

#ifdef SIMCORE_CUDA_EMULATION
#include "cuda/emulation/cuda_emulation.h"
#endif

PYBIND11_MODULE(SIMCORE_MODULE_NAME, m) {
  m.doc() = "simcore's compiled kernels (C++ and, when built with nvcc, CUDA; _C_emu: CUDA emulated on the host)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const simcore::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const simcore::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  py::dict info;
#ifdef SIMCORE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_runtime_version"] = simcore::cuda::runtime_version();
#else
  info["cuda"] = false;
  info["cuda_runtime_version"] = 0;
#endif
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#ifdef __AVX512F__
  info["avx512"] = true;
#else
  info["avx512"] = false;
#endif
#ifdef SIMCORE_CUDA_EMULATION
  info["cuda_emulation"] = true;
#ifdef __SANITIZE_ADDRESS__
  info["address_sanitizer"] = true;  // tests/test_cuda_emulation.py checks that ASan sees the kernels
#else
  info["address_sanitizer"] = false;
#endif
  // The order a block's threads run in between synchronisations (cuda_emulation.h).
  m.def("emulation_schedule", [](const std::string& order, uint64_t seed) {
    using simcore::emu::Schedule;
    SIMCORE_CHECK(order == "forward" || order == "reverse" || order == "random",
                  "schedule must be forward, reverse or random, got ", order);
    simcore::emu::set_schedule(order == "forward" ? Schedule::Forward
                               : order == "reverse" ? Schedule::Reverse : Schedule::Random, seed);
  });
  m.def("emulation_selftest", &simcore::emu::selftest);
#else
  info["cuda_emulation"] = false;
#endif
  m.attr("build_info") = info;

  // Number of CUDA devices the driver reports; 0 without CUDA, driver or GPU.
  m.def("cuda_device_count", []() {
#ifdef SIMCORE_WITH_CUDA
    return simcore::cuda::device_count();
#else
    return 0;
#endif
  });

  // What the CUDA runtime linked into simcore finds (no context is created):
  // simcore/dispatch.py:cuda_status() reads it.
  m.def("cuda_probe", []() {
    py::dict out;
#ifdef SIMCORE_WITH_CUDA
    const simcore::cuda::Probe& p = simcore::cuda::probe();
    out["runtime_version"] = p.runtime_version;
    out["driver_version"] = p.driver_version;
    out["device_count"] = p.device_count;
    out["error"] = p.error;
#else
    out["runtime_version"] = 0;
    out["driver_version"] = 0;
    out["device_count"] = 0;
    out["error"] = "simcore was built without CUDA";
#endif
    return out;
  });

  // What the boundary makes of a packed tensor; lets tests exercise its checks.
  m.def("inspect_tensor", [](const py::handle& t) {
    const simcore::TensorView v = simcore::tensor_from_py(t, "tensor");
    py::list shape, strides;
    for (int d = 0; d < v.ndim; ++d) {
      shape.append(v.shape[d]);
      strides.append(v.strides[d]);
    }
    py::dict out;
    out["dtype"] = simcore::dtype_name(v.dtype);
    out["shape"] = py::tuple(shape);
    out["strides"] = py::tuple(strides);
    out["contiguous"] = v.is_contiguous();
    return out;
  });

  // Huge pages for a large row table before it is first written (cpu/huge_pages.h).
  m.def("advise_huge_pages", [](const py::handle& t) {
    const simcore::TensorView v = simcore::tensor_from_py(t, "table");
    v.expect_device(simcore::Device::CPU, 0).expect_contiguous();
    return simcore::cpu::advise_huge_pages(v.data, v.numel() * simcore::itemsize(v.dtype));
  }, "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of a contiguous CPU tensor; returns the bytes advised",
        py::arg("table"));

  simcore::bind_margin_softmax(m);
  simcore::bind_cosine_topk(m);
  simcore::bind_row_optimizer(m);
}
