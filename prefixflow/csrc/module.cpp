// The Python module that carries the kernels' library. The kernels register themselves
// with torch.ops when it loads (TORCH_LIBRARY in the other files); the module only says
// which vector instructions they were compiled for (all files get the same flags), so the
// loader (prefixflow/native.py) can check that this CPU has each of them. It is its own
// file so that only it pays for pybind11 and Python's headers, and the kernels include
// ATen alone: that halves the first-use build.

#include <pybind11/pybind11.h>

#include <string>

namespace {

// The vector instructions this build uses, named as /proc/cpuinfo names them, so the loader
// can check that the running CPU has each of them.
std::string compiled_isa() {
  std::string isa;
#if defined(__AVX2__)
  isa += " avx2";
#endif
#if defined(__FMA__)
  isa += " fma";
#endif
#if defined(__AVX512F__)
  isa += " avx512f";
#endif
#if defined(__AVX512BW__)
  isa += " avx512bw";
#endif
#if defined(__AVX512VL__)
  isa += " avx512vl";
#endif
#if defined(__AVX512DQ__)
  isa += " avx512dq";
#endif
#if defined(__AVX512VNNI__)
  isa += " avx512_vnni";
#endif
#if defined(__AVX512BF16__)
  isa += " avx512_bf16";
#endif
  return isa.empty() ? isa : isa.substr(1);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_isa", &compiled_isa, "the instruction set the kernels were compiled for");
}
