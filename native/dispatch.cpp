// Which instruction-set path runs: asked of the CPU at load, never assumed from the build machine.
#include "kernels.h"

namespace sparse_deploy {

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::portable:
      return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("popcnt");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("popcnt");
    case Isa::amx:
      return cpu_supports(Isa::avx512) && amx_enabled();
  }
  return false;
#else
  return isa == Isa::portable;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::portable:
      return "portable";
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    case Isa::amx:
      return "amx";
  }
  return "unknown";
}

KernelSet kernels_for(Isa isa) {
#if defined(__x86_64__)
  if (isa == Isa::amx) return {isa, sparse_f32_avx512, sparse_int8_amx, quantize_rows_avx512};
  if (isa == Isa::avx512) return {isa, sparse_f32_avx512, sparse_int8_avx512, quantize_rows_avx512};
  if (isa == Isa::avx2) return {isa, sparse_f32_avx2, sparse_int8_avx2, quantize_rows};
#endif
  return {Isa::portable, sparse_f32_portable, sparse_int8_portable, quantize_rows};
}

}  // namespace sparse_deploy
