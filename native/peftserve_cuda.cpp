// PeftServe's native CUDA helper: what TorchSharp 0.107 has no API for, built against libtorch's own
// headers so that it drives the same libtorch instance TorchSharp loaded (same allocator, same streams).
//   - CUDA graphs: capture the TorchSharp ops one decode step issues, then replay them with one call.
//   - The current CUDA stream, so that PeftServe's NVRTC kernels launch where libtorch's ops run
//     (during a capture that is the capture stream, not the legacy default stream).
// Every entry point catches C++ exceptions and returns a status with the message, because an exception
// must never cross into .NET. Build: native/build.sh (needs a CUDA toolkit and libtorch's headers).
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <exception>
#include <optional>
#include <string>

namespace {

struct Graph {
    explicit Graph(c10::DeviceIndex device) : device(device) {}
    c10::DeviceIndex device;
    at::cuda::CUDAGraph graph;
    std::optional<c10::cuda::CUDAStream> previous;   // the stream current before the capture began
    bool capturing = false;
};

int fail(const std::exception& e, char* error, int capacity) {
    if (error != nullptr && capacity > 0) {
        std::strncpy(error, e.what(), capacity - 1);
        error[capacity - 1] = '\0';
    }
    return -1;
}

// Puts back the stream that was current before the capture, after it has waited for the capture stream.
void restore_stream(Graph* g) {
    if (!g->previous) return;
    auto side = c10::cuda::getCurrentCUDAStream(g->device);
    c10::cuda::setCurrentCUDAStream(*g->previous);
    at::cuda::CUDAEvent done;
    done.record(side);
    done.block(*g->previous);
    g->previous.reset();
}

}  // namespace

extern "C" {

// Bumped whenever an entry point's meaning changes; the .NET side refuses a helper of another version.
int psc_abi_version() { return 1; }

// libtorch's current stream on a device (a cudaStream_t), for launching our own kernels on it.
void* psc_current_stream(int device) {
    return static_cast<void*>(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
}

// A memory pool graphs can share (pass the two halves to psc_capture_begin). Graphs that share a pool
// must be replayed one at a time, which the decode loop does.
void psc_pool_handle(unsigned long long* first, unsigned long long* second) {
    auto id = at::cuda::graph_pool_handle();
    *first = id.first;
    *second = id.second;
}

void* psc_graph_new(int device) {
    try {
        return new Graph(static_cast<c10::DeviceIndex>(device));
    } catch (...) {
        return nullptr;
    }
}

void psc_graph_free(void* handle) {
    auto* g = static_cast<Graph*>(handle);
    if (g == nullptr) return;
    try {
        if (g->capturing) restore_stream(g);
    } catch (...) {
    }
    delete g;
}

// Makes a side stream current (after it waited for the current one) and begins capturing on it, in
// thread-local mode: other threads may allocate pinned memory or launch work meanwhile.
int psc_capture_begin(void* handle, unsigned long long pool_first, unsigned long long pool_second, char* error, int capacity) {
    auto* g = static_cast<Graph*>(handle);
    try {
        c10::cuda::CUDAGuard guard(g->device);
        auto current = c10::cuda::getCurrentCUDAStream(g->device);
        auto side = c10::cuda::getStreamFromPool(false, g->device);
        at::cuda::CUDAEvent ready;
        ready.record(current);
        ready.block(side);
        g->previous = current;
        c10::cuda::setCurrentCUDAStream(side);
        g->capturing = true;
        g->graph.capture_begin({pool_first, pool_second}, cudaStreamCaptureModeThreadLocal);
        return 0;
    } catch (const std::exception& e) {
        try { restore_stream(g); } catch (...) {}
        g->capturing = false;
        return fail(e, error, capacity);
    }
}

// Ends the capture (instantiating the graph) and puts the previous stream back. On failure the stream is
// restored too, and the graph must not be replayed.
int psc_capture_end(void* handle, char* error, int capacity) {
    auto* g = static_cast<Graph*>(handle);
    int status = 0;
    try {
        c10::cuda::CUDAGuard guard(g->device);
        g->graph.capture_end();
    } catch (const std::exception& e) {
        status = fail(e, error, capacity);
    }
    try {
        restore_stream(g);
    } catch (const std::exception& e) {
        if (status == 0) status = fail(e, error, capacity);
    }
    g->capturing = false;
    return status;
}

// Replays the graph on the current stream.
int psc_replay(void* handle, char* error, int capacity) {
    auto* g = static_cast<Graph*>(handle);
    try {
        c10::cuda::CUDAGuard guard(g->device);
        g->graph.replay();
        return 0;
    } catch (const std::exception& e) {
        return fail(e, error, capacity);
    }
}

}  // extern "C"
