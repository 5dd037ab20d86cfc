/* A C application that runs a model with ai.sparse_deploy ops through ONNX Runtime's C API:
 *   run_sparse MODEL.onnx LIBRARY.so OUTPUT OUT.bin INPUT=TYPE:DIMS:FILE...
 * Each input is a raw file of TYPE (f32 or i64) elements of shape DIMS (e.g. 2x50; a dimension may be 0, as for an
 * empty KV cache, and then FILE is not read). The output named OUTPUT is written to OUT.bin as raw float32. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <onnxruntime_c_api.h>

static const OrtApi* api;

static void check(OrtStatus* status, const char* what) {
  if (!status) return;
  fprintf(stderr, "%s: %s\n", what, api->GetErrorMessage(status));
  api->ReleaseStatus(status);
  exit(1);
}

static void fail(const char* what, const char* arg) {
  fprintf(stderr, "%s: %s\n", what, arg);
  exit(1);
}

/* NAME=TYPE:DIMS:FILE -> an OrtValue over a buffer read from FILE (the buffer is kept in *data). */
static OrtValue* read_input(char* spec, OrtMemoryInfo* memory, const char** name, void** data) {
  char* eq = strchr(spec, '=');
  if (!eq) fail("an input must be NAME=TYPE:DIMS:FILE", spec);
  *eq = '\0';
  *name = spec;
  char* type = eq + 1;
  char* dims = strchr(type, ':');
  if (!dims) fail("missing DIMS in", spec);
  *dims++ = '\0';
  char* file = strchr(dims, ':');
  if (!file) fail("missing FILE in", spec);
  *file++ = '\0';
  int is_float = strcmp(type, "f32") == 0;
  if (!is_float && strcmp(type, "i64") != 0) fail("TYPE must be f32 or i64", type);
  size_t item = is_float ? sizeof(float) : sizeof(int64_t);
  int64_t shape[8];
  size_t rank = 0, count = 1;
  for (char* dim = strtok(dims, "x"); dim; dim = strtok(NULL, "x")) {
    if (rank == 8) fail("more than 8 dimensions in", *name);
    shape[rank] = atoll(dim);
    count *= (size_t)shape[rank++];
  }
  *data = calloc(count ? count : 1, item);
  if (count) {
    FILE* f = fopen(file, "rb");
    if (!f || fread(*data, item, count, f) != count) fail("cannot read", file);
    fclose(f);
  }
  OrtValue* value = NULL;
  check(api->CreateTensorWithDataAsOrtValue(memory, *data, item * count, shape, rank,
                                            is_float ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                                                     : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
                                            &value),
        "CreateTensorWithDataAsOrtValue");
  return value;
}

int main(int argc, char** argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: %s MODEL.onnx LIBRARY.so OUTPUT OUT.bin NAME=TYPE:DIMS:FILE...\n", argv[0]);
    return 2;
  }
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
  const int inputs = argc - 5;
  const char** in_names = calloc((size_t)inputs, sizeof(char*));
  OrtValue** in_values = calloc((size_t)inputs, sizeof(OrtValue*));
  void** buffers = calloc((size_t)inputs, sizeof(void*));
  for (int i = 0; i < inputs; ++i) in_values[i] = read_input(argv[5 + i], memory, &in_names[i], &buffers[i]);

  const char* out_names[] = {argv[3]};
  OrtValue* output = NULL;
  check(api->Run(session, NULL, in_names, (const OrtValue* const*)in_values, (size_t)inputs, out_names, 1, &output),
        "Run");
  OrtTensorTypeAndShapeInfo* info;
  size_t count;
  float* y;
  check(api->GetTensorTypeAndShape(output, &info), "GetTensorTypeAndShape");
  check(api->GetTensorShapeElementCount(info, &count), "GetTensorShapeElementCount");
  check(api->GetTensorMutableData(output, (void**)&y), "GetTensorMutableData");
  FILE* f = fopen(argv[4], "wb");
  if (!f || fwrite(y, sizeof(float), count, f) != count) fail("cannot write", argv[4]);
  fclose(f);
  printf("ran %s: %zu outputs\n", argv[1], count);

  api->ReleaseTensorTypeAndShapeInfo(info);
  api->ReleaseValue(output);
  for (int i = 0; i < inputs; ++i) {
    api->ReleaseValue(in_values[i]);
    free(buffers[i]);
  }
  free(buffers);
  free(in_values);
  free(in_names);
  api->ReleaseMemoryInfo(memory);
  api->ReleaseSession(session);
  api->ReleaseSessionOptions(options);
  api->ReleaseEnv(env);
  return 0;
}
