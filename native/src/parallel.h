// Splitting independent work over the machine's cores: one contiguous range of items per thread,
// so every thread writes only its own items' outputs.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <thread>
#include <vector>

namespace kvc {

// Threads to use: the cores, or KVC_NUM_THREADS if set (1 keeps all work in the calling thread:
// what callgrind's per-function instruction counts in bench/instructions.py need).
inline int64_t max_threads() {
    static const int64_t n = [] {
        const char * env = std::getenv("KVC_NUM_THREADS");
        const long v = env != nullptr ? std::strtol(env, nullptr, 10) : 0;
        return v > 0 ? static_cast<int64_t>(v) : static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
    }();
    return n;
}

// Runs work(i0, i1) over [0, n) split into one range per core (in the calling thread alone when
// `worth` is false: spawning costs tens of microseconds). An exception in a worker is rethrown in
// the caller as std::bad_alloc after every thread has joined; none escapes a thread.
template <typename F>
void parallel_for(int64_t n, F && work, bool worth = true) {
    const int64_t hw = max_threads();
    const int64_t n_threads = worth ? std::max<int64_t>(1, std::min<int64_t>(n, hw)) : 1;
    const int64_t per = (n + n_threads - 1) / n_threads;  // items per thread
    std::atomic<bool> failed{false};
    auto guarded = [&](int64_t i0, int64_t i1) {
        try {
            work(i0, i1);
        } catch (...) {
            failed = true;
        }
    };
    std::vector<std::thread> pool;
    int64_t next = per;  // first item no thread has taken
    try {
        for (; next < n; next += per) {
            pool.emplace_back(guarded, next, std::min(n, next + per));
        }
    } catch (...) {
        guarded(next, n);  // no more threads: this one does the rest
    }
    guarded(0, std::min(n, per));
    for (auto & th : pool) th.join();
    if (failed) throw std::bad_alloc();
}

}  // namespace kvc
