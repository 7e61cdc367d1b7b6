// A caching allocator for large CPU blocks, installed with cpu_cache_enable (train/memory.py).
//
// glibc mmaps every block above 32 MiB and unmaps it on free, so a training step whose
// activations are hundreds of MiB (ALIGNN's line graph) has the kernel map and zero-fill them
// again every step: more system than user time. This allocator keeps freed blocks of at least
// min_bytes in per-size-class free lists (classes 2^k * {4, 5, 6, 7} / 4: at most 25 % slack)
// and hands them out again, like PyTorch's CUDA caching allocator. Its footprint (live + cached)
// never exceeds the largest live total seen: a miss first releases cached blocks, largest first.
// Smaller blocks are allocated and freed as the default CPU allocator does (c10::alloc_cpu and
// free_cpu, without its memory-profiler reporting). Every block keeps context == data and one
// deleter, so the raw interface (raw_allocate / raw_deallocate, used by kernels for scratch
// buffers) works as with the default allocator.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kAlignment = 64;

size_t size_class(size_t n) {
  size_t p = 1;
  while (p <= n / 2) p *= 2;  // p <= n < 2p
  const size_t q = std::max<size_t>(p / 4, kAlignment);
  return (n + q - 1) / q * q;
}

void cached_free(void* p);

struct CachingCPUAllocator final : c10::Allocator {
  size_t min_bytes = 1 << 20;
  std::mutex mu;
  std::unordered_map<void*, size_t> live;             // block -> its size class
  std::map<size_t, std::vector<void*>> free_blocks;   // size class -> cached blocks
  size_t live_bytes = 0, cached_bytes = 0, peak_bytes = 0;
  int64_t hits = 0, misses = 0, released = 0;

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes) {
      void* small = c10::alloc_cpu(n);
      return {small, small, &cached_free, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t sz = size_class(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = free_blocks.find(sz);
      if (it != free_blocks.end()) {
        p = it->second.back();
        it->second.pop_back();
        if (it->second.empty()) free_blocks.erase(it);
        cached_bytes -= sz;
        ++hits;
      } else {
        ++misses;
        while (cached_bytes > 0 && live_bytes + cached_bytes + sz > peak_bytes) release_largest();
      }
      if (p != nullptr) {
        live.emplace(p, sz);
        live_bytes += sz;
      }
    }
    if (p == nullptr) {
      p = c10::alloc_cpu(sz);  // raises c10::OutOfMemoryError with the size
      std::lock_guard<std::mutex> g(mu);
      live.emplace(p, sz);
      live_bytes += sz;
      peak_bytes = std::max(peak_bytes, live_bytes + cached_bytes);
    }
    return {p, p, &cached_free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &cached_free; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void release_largest() {  // mu held
    auto it = std::prev(free_blocks.end());
    c10::free_cpu(it->second.back());
    it->second.pop_back();
    cached_bytes -= it->first;
    ++released;
    if (it->second.empty()) free_blocks.erase(it);
  }

  void give_back(void* p) {
    std::unique_lock<std::mutex> g(mu);
    auto it = live.find(p);
    if (it == live.end()) {  // a small block
      g.unlock();
      c10::free_cpu(p);
      return;
    }
    const size_t sz = it->second;
    live.erase(it);
    live_bytes -= sz;
    free_blocks[sz].push_back(p);
    cached_bytes += sz;
  }

  void empty() {
    std::lock_guard<std::mutex> g(mu);
    while (cached_bytes > 0) release_largest();
  }
};

// Never destroyed: tensors may outlive static destruction at exit.
CachingCPUAllocator* instance() {
  static auto* a = new CachingCPUAllocator();
  return a;
}

void cached_free(void* p) { instance()->give_back(p); }

std::mutex enable_mu;
bool enabled = false;

bool cpu_cache_enable(int64_t min_bytes) {
  TORCH_CHECK(min_bytes >= 1, "cpu_cache_enable: min_bytes must be at least 1, got ", min_bytes);
  std::lock_guard<std::mutex> g(enable_mu);
  auto* a = instance();
  if (!enabled) {
    a->min_bytes = static_cast<size_t>(min_bytes);
    c10::SetCPUAllocator(a, /*priority=*/100);
    enabled = c10::GetCPUAllocator() == a;
  }
  return enabled;
}

// [enabled, hits, misses, released, live bytes, cached bytes, peak bytes]
std::vector<int64_t> cpu_cache_stats() {
  auto* a = instance();
  std::lock_guard<std::mutex> g(a->mu);
  return {enabled ? 1 : 0, a->hits, a->misses, a->released, static_cast<int64_t>(a->live_bytes),
          static_cast<int64_t>(a->cached_bytes), static_cast<int64_t>(a->peak_bytes)};
}

void cpu_cache_empty() { instance()->empty(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(uae_dist, m) {
  // Large-block CPU caching allocator (csrc/cpu_cache.cpp): enable once per process; blocks of
  // at least min_bytes are cached. Returns whether it is the CPU allocator now.
  m.def("cpu_cache_enable(int min_bytes) -> bool", &cpu_cache_enable);
  m.def("cpu_cache_stats() -> int[]", &cpu_cache_stats);
  m.def("cpu_cache_empty() -> ()", &cpu_cache_empty);
}
