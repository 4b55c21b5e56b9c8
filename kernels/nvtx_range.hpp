// NVTX ranges (the CUDA toolkit's header-only nvtx3) that name the stages of a MoE forward, so that Nsight
// Systems shows route / plan / dispatch / experts / combine on the host timeline (domain "eplab"), above the
// kernels and copies each stage launches:
//
//   nsys profile --trace=cuda,nvtx -o ch02 build/chapters/02_moe_grouped/02_moe_grouped --tokens 4096
//
// Host-side only: nothing is enqueued on a stream, so a range inside a CUDA graph capture is harmless (it is
// seen once, while the graph is recorded; replays show the graph launch). Without a profiler attached, each
// push or pop is a call through a null function pointer check.
#pragma once
#include <nvtx3/nvToolsExt.h>

namespace eplab {

inline nvtxDomainHandle_t nvtx_domain() {
  static const nvtxDomainHandle_t domain = nvtxDomainCreateA("eplab");
  return domain;
}

inline void nvtx_push(const char* name) {
  nvtxEventAttributes_t a{};
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  a.messageType = NVTX_MESSAGE_TYPE_ASCII;
  a.message.ascii = name;
  nvtxDomainRangePushEx(nvtx_domain(), &a);
}
inline void nvtx_pop() { nvtxDomainRangePop(nvtx_domain()); }

// One range for the life of the object (e.g. a whole forward).
class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtx_push(name); }
  ~NvtxRange() { nvtx_pop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

// The consecutive stages of one flow: next("plan") ends the stage that is open (if any) and opens "plan";
// the destructor ends the last one, so a flow with early returns needs no bookkeeping.
class NvtxStages {
 public:
  NvtxStages() = default;
  ~NvtxStages() { end(); }
  NvtxStages(const NvtxStages&) = delete;
  NvtxStages& operator=(const NvtxStages&) = delete;
  void next(const char* stage) {
    end();
    nvtx_push(stage);
    open_ = true;
  }
  void end() {
    if (open_) nvtx_pop();
    open_ = false;
  }

 private:
  bool open_ = false;
};

}  // namespace eplab
