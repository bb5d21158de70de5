// Internal helpers shared by the native sources: per-thread error detail and the guard that
// turns C++ exceptions into status codes at the C boundary.
#pragma once

#include "kvcompose.h"

#include <new>
#include <string>

namespace kvc {

// Records a failure for kvc_last_error() and returns its status, so call sites can write
// `return fail(KVC_ERR_..., "why")`.
int32_t fail(int32_t status, const std::string & detail);
void    clear_error();

// Runs f() and converts anything it throws into a status: no exception crosses the C API.
template <typename F>
int32_t guard(F && f) noexcept {
    try {
        clear_error();
        return f();
    } catch (const std::bad_alloc &) {
        return fail(KVC_ERR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception & e) {
        return fail(KVC_ERR_INTERNAL, e.what());
    } catch (...) {
        return fail(KVC_ERR_INTERNAL, "unknown C++ exception");
    }
}

}  // namespace kvc
