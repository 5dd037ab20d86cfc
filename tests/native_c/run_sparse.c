/* A C application that runs a model with ai.sparse_deploy ops through ONNX Runtime's C API:
 *   run_sparse MODEL.onnx LIBRARY.so X.bin M K Y.bin
 * X.bin holds M*K float32 (the model's input "X"); the output "Y" is written to Y.bin as raw float32. */
#include <stdio.h>
#include <stdlib.h>

#include <onnxruntime_c_api.h>

static const OrtApi* api;

static int check(OrtStatus* status, const char* what) {
  if (!status) return 0;
  fprintf(stderr, "%s: %s\n", what, api->GetErrorMessage(status));
  api->ReleaseStatus(status);
  exit(1);
}

int main(int argc, char** argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s MODEL.onnx LIBRARY.so X.bin M K Y.bin\n", argv[0]);
    return 2;
  }
  const int64_t m = atoll(argv[4]), k = atoll(argv[5]);
  float* x = malloc(sizeof(float) * (size_t)(m * k));
  FILE* f = fopen(argv[3], "rb");
  if (!f || fread(x, sizeof(float), (size_t)(m * k), f) != (size_t)(m * k)) {
    fprintf(stderr, "cannot read %s\n", argv[3]);
    return 1;
  }
  fclose(f);

  api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  OrtEnv* env;
  OrtSessionOptions* options;
  OrtSession* session;
  check(api->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "run_sparse", &env), "CreateEnv");
  check(api->CreateSessionOptions(&options), "CreateSessionOptions");
  check(api->SetIntraOpNumThreads(options, 2), "SetIntraOpNumThreads");
  check(api->RegisterCustomOpsLibrary_V2(options, argv[2]), "RegisterCustomOpsLibrary_V2");
  check(api->CreateSession(env, argv[1], options, &session), "CreateSession");

  OrtMemoryInfo* memory;
  check(api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &memory), "CreateCpuMemoryInfo");
  const int64_t shape[2] = {m, k};
  OrtValue* input = NULL;
  OrtValue* output = NULL;
  check(api->CreateTensorWithDataAsOrtValue(memory, x, sizeof(float) * (size_t)(m * k), shape, 2,
                                            ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &input),
        "CreateTensor");
  const char* in_names[] = {"X"};
  const char* out_names[] = {"Y"};
  check(api->Run(session, NULL, in_names, (const OrtValue* const*)&input, 1, out_names, 1, &output), "Run");

  OrtTensorTypeAndShapeInfo* info;
  size_t count;
  float* y;
  check(api->GetTensorTypeAndShape(output, &info), "GetTensorTypeAndShape");
  check(api->GetTensorShapeElementCount(info, &count), "GetTensorShapeElementCount");
  check(api->GetTensorMutableData(output, (void**)&y), "GetTensorMutableData");
  f = fopen(argv[6], "wb");
  if (!f || fwrite(y, sizeof(float), count, f) != count) {
    fprintf(stderr, "cannot write %s\n", argv[6]);
    return 1;
  }
  fclose(f);
  printf("ran %s: %zu outputs\n", argv[1], count);

  api->ReleaseTensorTypeAndShapeInfo(info);
  api->ReleaseValue(output);
  api->ReleaseValue(input);
  api->ReleaseMemoryInfo(memory);
  api->ReleaseSession(session);
  api->ReleaseSessionOptions(options);
  api->ReleaseEnv(env);
  free(x);
  return 0;
}
