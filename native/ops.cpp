// ONNX Runtime custom ops of domain ai.sparse_deploy over the kernels in kernels.h:
//   SparseMatMul     (X float [..., K], mask uint8 [N, 8*ceil(K/64)], values float [nnz], row_ptr int64 [N+1],
//                     bias float [N] optional) -> Y float [..., N] = X @ W^T + bias
//   SparseMatMulInt8 (X, mask, values int8 [nnz], row_ptr, scale float [N], bias optional) -> Y, with X quantized
//                     per row (s = max|x|/127) and exact int32 sums.
// Built against the C API headers only (ORT_API_MANUAL_INIT): ONNX Runtime hands us its API in RegisterCustomOps.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"

namespace sparse_deploy {
namespace {

constexpr const char* kDomain = "ai.sparse_deploy";
constexpr int64_t kRowBlock = 32;               // rows of W per parallel task
constexpr int64_t kPrefillRows = 16;            // from this many rows of X, tasks of kPrefillRowBlock rows of W:
constexpr int64_t kPrefillRowBlock = 192;       // the prefill kernels decode W in panels of 48 rows
constexpr int64_t kInlineWork = int64_t{1} << 16;  // below this many multiply-adds, no threads

struct BadInput {
  std::string message;
};

// The path RegisterCustomOps picks: SPARSE_DEPLOY_ISA if set (must be supported), else the best the CPU has.
bool choose_isa(Isa* out, std::string* error) {
  const char* forced = std::getenv("SPARSE_DEPLOY_ISA");
  if (forced && *forced) {
    for (Isa isa : {Isa::amx, Isa::avx512, Isa::avx2, Isa::portable}) {
      if (std::strcmp(forced, isa_name(isa)) != 0) continue;
      if (!cpu_supports(isa)) {
        *error = std::string("SPARSE_DEPLOY_ISA=") + forced + " but this CPU does not support that path";
        return false;
      }
      *out = isa;
      return true;
    }
    *error = std::string("SPARSE_DEPLOY_ISA=") + forced + " is not one of amx, avx512, avx2, portable";
    return false;
  }
  for (Isa isa : {Isa::amx, Isa::avx512, Isa::avx2}) {
    if (cpu_supports(isa)) {
      *out = isa;
      return true;
    }
  }
  *out = Isa::portable;
  return true;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

struct Task {
  KernelSet kernels;
  const float* x;
  const int8_t* xq;
  const float* x_scale;
  int64_t m_rows;
  SparseRows w;
  const void* values;
  const float* w_scale;
  const float* bias;
  float* y;
  bool int8;
  int64_t row_block;
};

void run_block(const Task& t, int64_t n0, int64_t n1) {
  if (t.int8)
    t.kernels.int8(t.xq, t.x_scale, t.m_rows, t.w, static_cast<const int8_t*>(t.values), t.w_scale, t.bias, n0, n1,
                   t.y, t.w.n_rows);
  else
    t.kernels.f32(t.x, t.m_rows, t.w, static_cast<const float*>(t.values), t.bias, n0, n1, t.y, t.w.n_rows);
}

void run_task(void* data, size_t block) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t n0 = static_cast<int64_t>(block) * t.row_block;
  run_block(t, n0, std::min(t.w.n_rows, n0 + t.row_block));
}

class SparseKernel {
 public:
  SparseKernel(const OrtKernelInfo* info, KernelSet kernels, bool int8) : kernels_(kernels), int8_(int8) {
    Ort::ConstKernelInfo ki(info);
    name_ = ki.GetNodeName();
    int constant = 0;
    weights_constant_ = true;
    for (size_t i = 1; i <= 3; ++i) {
      ki.GetTensorConstantInput(i, &constant);
      weights_constant_ = weights_constant_ && constant;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const BadInput& e) {
      const std::string op = int8_ ? "SparseMatMulInt8" : "SparseMatMul";
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, (op + " node '" + name_ + "': " + e.message).c_str());
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }

 private:
  static std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t count = ctx.GetInputCount();
    Ort::ConstValue x = ctx.GetInput(0), mask = ctx.GetInput(1), values = ctx.GetInput(2), row_ptr = ctx.GetInput(3);
    Ort::ConstValue scale{nullptr}, bias{nullptr};
    size_t bias_index = 4;
    if (int8_) {
      scale = ctx.GetInput(4);
      bias_index = 5;
    }
    if (count > bias_index) bias = ctx.GetInput(bias_index);

    const std::vector<int64_t> xs = shape_of(x), ms = shape_of(mask), vs = shape_of(values), rs = shape_of(row_ptr);
    if (xs.empty()) throw BadInput{"X must have at least one dimension, got a scalar"};
    const int64_t k = xs.back();
    if (ms.size() != 2) throw BadInput{"mask must be 2-D [N, 8*ceil(K/64)], got " + shape_str(ms)};
    const int64_t n = ms[0];
    if (ms[1] != mask_stride_for(k))
      throw BadInput{"mask " + shape_str(ms) + " needs " + std::to_string(mask_stride_for(k)) +
                     " bytes per row for X's last dimension K=" + std::to_string(k)};
    if (vs.size() != 1) throw BadInput{"values must be 1-D [nnz], got " + shape_str(vs)};
    if (rs.size() != 1 || rs[0] != n + 1)
      throw BadInput{"row_ptr must be [N+1] = [" + std::to_string(n + 1) + "], got " + shape_str(rs)};
    if (int8_) {
      const std::vector<int64_t> ss = shape_of(scale);
      if (ss.size() != 1 || ss[0] != n)
        throw BadInput{"scale must be [N] = [" + std::to_string(n) + "], got " + shape_str(ss)};
    }
    if (bias) {
      const std::vector<int64_t> bs = shape_of(bias);
      if (bs.size() != 1 || bs[0] != n)
        throw BadInput{"bias must be [N] = [" + std::to_string(n) + "], got " + shape_str(bs)};
    }

    SparseRows w{mask.GetTensorData<uint8_t>(), row_ptr.GetTensorData<int64_t>(), n, k, ms[1]};
    check_layout(w, vs[0]);

    std::vector<int64_t> ys(xs);
    ys.back() = n;
    Ort::UnownedValue y = ctx.GetOutput(0, ys);
    int64_t m_rows = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) m_rows *= xs[i];
    if (m_rows == 0 || n == 0) return;

    Task t{kernels_, x.GetTensorData<float>(), nullptr, nullptr, m_rows, w, nullptr,
           nullptr, bias ? bias.GetTensorData<float>() : nullptr, y.GetTensorMutableData<float>(), int8_,
           m_rows >= kPrefillRows ? kPrefillRowBlock : kRowBlock};
    std::vector<int8_t> xq;
    std::vector<float> x_scale;
    if (int8_) {
      xq.resize(static_cast<size_t>(m_rows * quantized_stride_for(k)));
      x_scale.resize(static_cast<size_t>(m_rows));
      t.kernels.quantize(t.x, m_rows, k, xq.data(), x_scale.data());
      t.xq = xq.data();
      t.x_scale = x_scale.data();
      t.values = values.GetTensorData<int8_t>();
      t.w_scale = scale.GetTensorData<float>();
    } else {
      t.values = values.GetTensorData<float>();
    }

    const int64_t blocks = (n + t.row_block - 1) / t.row_block;
    if (blocks == 1 || m_rows * vs[0] < kInlineWork) {
      run_block(t, 0, n);
    } else {
      ctx.ParallelFor(run_task, static_cast<size_t>(blocks), 0, &t);
    }
  }

  // Validates the layout once when the weights are constant initializers, else on every call.
  void check_layout(const SparseRows& w, int64_t nnz) {
    if (weights_constant_ && validated_.load(std::memory_order_acquire)) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (weights_constant_ && validated_.load(std::memory_order_relaxed)) return;
    if (const char* error = validate(w, nnz))
      throw BadInput{std::string(error) + " (N=" + std::to_string(w.n_rows) + ", K=" + std::to_string(w.k) +
                     ", " + std::to_string(nnz) + " values)"};
    validated_.store(true, std::memory_order_release);
  }

  KernelSet kernels_;
  bool int8_;
  std::string name_;
  bool weights_constant_ = false;
  std::atomic<bool> validated_{false};
  std::mutex mutex_;
};

template <bool Int8>
struct SparseOp : Ort::CustomOpBase<SparseOp<Int8>, SparseKernel, true> {
  explicit SparseOp(KernelSet kernels) : kernels_(kernels) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new SparseKernel(info, kernels_, Int8);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    }
  }
  const char* GetName() const { return Int8 ? "SparseMatMulInt8" : "SparseMatMul"; }
  size_t GetInputTypeCount() const { return Int8 ? 6 : 5; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 1:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 2:
        return Int8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      case 3:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index + 1 == GetInputTypeCount() ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  KernelSet kernels_;
};

// One domain per path, made on first use and kept for the life of the process: ONNX Runtime does not own custom
// op domains, and sessions may outlive the session options that registered them.
struct Registry {
  SparseOp<false> f32;
  SparseOp<true> int8;
  OrtCustomOpDomain* domain = nullptr;
  explicit Registry(KernelSet k) : f32(k), int8(k) {}
};

OrtStatus* register_ops(OrtSessionOptions* options, const OrtApi* api) {
  Isa isa;
  std::string error;
  if (!choose_isa(&isa, &error)) return api->CreateStatus(ORT_INVALID_ARGUMENT, error.c_str());
  static std::mutex mutex;
  static Registry* registries[4] = {nullptr, nullptr, nullptr, nullptr};  // one per Isa
  std::lock_guard<std::mutex> lock(mutex);
  Registry*& reg = registries[static_cast<int>(isa)];
  if (!reg) {
    auto* r = new Registry(kernels_for(isa));
    if (OrtStatus* s = api->CreateCustomOpDomain(kDomain, &r->domain)) return s;
    if (OrtStatus* s = api->CustomOpDomain_Add(r->domain, &r->f32)) return s;
    if (OrtStatus* s = api->CustomOpDomain_Add(r->domain, &r->int8)) return s;
    reg = r;
  }
  return api->AddCustomOpDomain(options, reg->domain);
}

}  // namespace
}  // namespace sparse_deploy

extern "C" {

// ONNX Runtime's entry point: SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary.
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (!api)
    return base->GetApi(1)->CreateStatus(ORT_FAIL, "this ONNX Runtime is older than the headers the sparse ops were built with");
  Ort::InitApi(api);
  return sparse_deploy::register_ops(options, api);
}

// The path RegisterCustomOps would pick now ("avx512", "avx2", "portable"), or an error message starting with
// "error: ". For callers without ONNX Runtime (ctypes).
__attribute__((visibility("default"))) const char* SparseDeployIsa(void) {
  sparse_deploy::Isa isa;
  std::string error;
  if (!sparse_deploy::choose_isa(&isa, &error)) return "error: SPARSE_DEPLOY_ISA names a path this CPU lacks";
  return sparse_deploy::isa_name(isa);
}

}  // extern "C"
