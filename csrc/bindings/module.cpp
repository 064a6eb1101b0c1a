// genkernels._C: the one file that lists every entry point of the extension module.
//
// Entry points are torch-free: they take raw pointers (uintptr_t), sizes, int64 strides, a dtype
// code (gk::DType), a device code (gk::Device), the caller's CUDA stream (uintptr_t) and the CPU
// thread count. The Python layer (python/genkernels) validates every argument first; the checks
// here re-state shape consistency so that no call can reach a kernel with an impossible problem
// (std::invalid_argument becomes ValueError). The GIL is released while kernels run.
#include <pybind11/pybind11.h>

#include <omp.h>
#include <stdexcept>
#include <string>

#include "core/common.h"
#include "core/merge_params.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cuda/launchers.h"

namespace py = pybind11;

namespace {

using gk::Device;

template <class T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("genkernels: " + what);
}

Device device_of(int code) {
  switch (code) {
    case static_cast<int>(Device::kCPU): return Device::kCPU;
    case static_cast<int>(Device::kCUDA):
      if (!GK_WITH_CUDA) throw std::runtime_error("genkernels: this build has no CUDA kernels (built without nvcc)");
      return Device::kCUDA;
    case static_cast<int>(Device::kEmulated):
      if (!GK_WITH_EMU) throw std::runtime_error("genkernels: this build has no CUDA emulation (GK_EMU=OFF)");
      return Device::kEmulated;
  }
  throw std::invalid_argument("genkernels: unknown device code " + std::to_string(code));
}

// Turns a launcher's cudaError_t into an exception.
void check_launch(int err, const char* op) {
  if (err == 0) return;
  std::string msg = std::string("genkernels.") + op + ": ";
  if (err == gk::cuda::kErrorNotCompiled) {
    msg += "this kernel instantiation was trimmed from the build (GK_KERNELS)";
  } else {
#if GK_WITH_CUDA
    msg += std::string("CUDA error: ") + gk::cuda::error_string(err);
#else
    msg += "emulated launch failed with code " + std::to_string(err);
#endif
  }
  throw std::runtime_error(msg);
}

// Runs `cpu()` or the CUDA / emulated launcher for the device.
template <class Cpu, class Cuda, class Emu>
void run_on(Device dev, const char* op, Cpu&& cpu, Cuda&& cuda_launch, Emu&& emu_launch) {
  switch (dev) {
    case Device::kCPU: cpu(); return;
    case Device::kCUDA: check_launch(cuda_launch(), op); return;
    case Device::kEmulated: check_launch(emu_launch(), op); return;
  }
}

// ------------------------------------------------------------------ merge_attention_states
void merge_attention_states(int device, int dtype, uintptr_t out_first, uintptr_t out_rest, uintptr_t lse_first,
                            uintptr_t lse_rest, int64_t num_partials, int64_t out_partial_stride,
                            int64_t lse_partial_stride, int64_t batch, int64_t seqlen, int64_t heads,
                            int64_t head_dim, int64_t ofs_b, int64_t ofs_s, int64_t ofs_h, int64_t ors_b,
                            int64_t ors_s, int64_t ors_h, int64_t lfs_b, int64_t lfs_h, int64_t lfs_s,
                            int64_t lrs_b, int64_t lrs_h, int64_t lrs_s, uintptr_t dst_out, uintptr_t dst_lse,
                            uintptr_t stream, int num_threads) {
  const Device dev = device_of(device);
  require(num_partials >= 1, "merge_attention_states: need at least one partial state");
  require(batch >= 0 && seqlen >= 0 && heads >= 0 && head_dim >= 1, "merge_attention_states: negative or zero size");
  require(num_threads >= 1, "merge_attention_states: num_threads must be >= 1");
  gk::MergeStatesParams p;
  p.out_first = as_ptr<const void>(out_first);
  p.out_rest = as_ptr<const void>(out_rest);
  p.lse_first = as_ptr<const float>(lse_first);
  p.lse_rest = as_ptr<const float>(lse_rest);
  p.num_partials = num_partials;
  p.out_partial_stride = out_partial_stride;
  p.lse_partial_stride = lse_partial_stride;
  p.batch = batch, p.seqlen = seqlen, p.heads = heads, p.head_dim = head_dim;
  const int64_t ofs[3] = {ofs_b, ofs_s, ofs_h}, ors[3] = {ors_b, ors_s, ors_h};
  const int64_t lfs[3] = {lfs_b, lfs_h, lfs_s}, lrs[3] = {lrs_b, lrs_h, lrs_s};
  for (int k = 0; k < 3; ++k) {
    p.out_first_stride[k] = ofs[k], p.out_rest_stride[k] = ors[k];
    p.lse_first_stride[k] = lfs[k], p.lse_rest_stride[k] = lrs[k];
  }
  p.dst_out = as_ptr<void>(dst_out);
  p.dst_lse = as_ptr<float>(dst_lse);
  if (p.rows() == 0) return;
  require(p.out_first && p.lse_first && p.dst_out, "merge_attention_states: null pointer");
  require(num_partials == 1 || (p.out_rest && p.lse_rest), "merge_attention_states: null pointer for partials 1..");
  void* s = as_ptr<void>(stream);
  GK_DISPATCH_DTYPE(dtype, T,
    run_on(dev, "merge_attention_states",
      [&] { GK_CPU_DISPATCH(merge_attention_states<T>, p, num_threads); },
      [&] { return GK_WITH_CUDA ? gk::cuda::merge_attention_states<T>(p, s) : 0; },
      [&] { return GK_WITH_EMU ? gk::cuda_emu::merge_attention_states<T>(p, s) : 0; }));
}

// ------------------------------------------------------------------ runtime information
py::dict build_info() {
  py::dict d;
  d["version"] = GK_VERSION;
  d["with_cuda"] = bool(GK_WITH_CUDA);
  d["cuda_archs"] = std::string(GK_CUDA_ARCHS_STR);
  d["with_emulation"] = bool(GK_WITH_EMU);
  d["cpu_isa"] = gk::cpu::isa_name(gk::cpu::active_isa());
  d["cpu_isa_detected"] = gk::cpu::isa_name(gk::cpu::detect_isa());
  d["cpu_isas_compiled"] = gk::cpu::compiled_isas();
  d["openmp_max_threads"] = omp_get_max_threads();
  return d;
}

py::tuple cuda_device_count() {
#if GK_WITH_CUDA
  char why[256] = {0};
  const int n = gk::cuda::device_count(why, sizeof why);
  return py::make_tuple(n < 0 ? 0 : n, std::string(why));
#else
  return py::make_tuple(0, std::string("built without CUDA"));
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "genkernels native module (torch-free entry points; see python/genkernels for the API)";
  m.def("build_info", &build_info);
  m.def("cuda_device_count", &cuda_device_count, "(count, reason when 0)");
  m.def("reload_cpu_isa", &gk::cpu::set_isa_from_env, "re-read GK_CPU_ISA");
  m.def("merge_attention_states", &merge_attention_states, py::call_guard<py::gil_scoped_release>());
}
