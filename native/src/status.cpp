#include "status.h"

#include "llama.h"

#ifndef KVC_LLAMA_CPP_PYTHON_VERSION
#error "KVC_LLAMA_CPP_PYTHON_VERSION must be defined by the build"
#endif

namespace kvc {

static thread_local std::string g_last_error;

int32_t fail(int32_t status, const std::string & detail) {
    g_last_error = detail;
    return status;
}

void clear_error() { g_last_error.clear(); }

}  // namespace kvc

extern "C" {

const char * kvc_status_str(int32_t status) {
    switch (status) {
        case KVC_OK:                   return "KVC_OK";
        case KVC_ERR_INVALID_ARGUMENT: return "KVC_ERR_INVALID_ARGUMENT";
        case KVC_ERR_CORRUPT_STATE:    return "KVC_ERR_CORRUPT_STATE";
        case KVC_ERR_UNSUPPORTED:      return "KVC_ERR_UNSUPPORTED";
        case KVC_ERR_OUT_OF_MEMORY:    return "KVC_ERR_OUT_OF_MEMORY";
        case KVC_ERR_LLAMA:            return "KVC_ERR_LLAMA";
        case KVC_ERR_CAPTURE:          return "KVC_ERR_CAPTURE";
        case KVC_ERR_INTERNAL:         return "KVC_ERR_INTERNAL";
        default:                       return "unknown status";
    }
}

const char * kvc_last_error(void) { return kvc::g_last_error.c_str(); }

int32_t kvc_api_version(void) { return KVC_API_VERSION; }

const char * kvc_llama_cpp_python_version(void) { return KVC_LLAMA_CPP_PYTHON_VERSION; }

size_t kvc_sizeof_llama_context_params(void) { return sizeof(struct llama_context_params); }

}  // extern "C"
