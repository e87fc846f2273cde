// cuDNN's fused attention (SDPA forward) behind a C ABI, for the Hopper path of
// `apb_kernels::attention`. Host code only: the kernels are cuDNN's (PyTorch's default attention on
// Hopper). libcudnn.so.9 is opened at run time (dlopen), so the binary runs without cuDNN and falls
// back to our own kernel. One graph per shape/stride/mask key, built once and cached.

#include <cudnn_frontend.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace fe = cudnn_frontend;

// The frontend's dynamic loading reads this handle.
namespace cudnn_frontend {
void *cudnn_dlhandle = nullptr;
}  // namespace cudnn_frontend

extern "C" {
// Must match `CudnnSdpa` in kernels/src/attention/cudnn.rs.
struct ApbSdpa {
    void *q, *k, *v, *o;
    float *lse;  // (b, hq, sq) contiguous f32, or null
    void *stream;
    int64_t b, hq, hkv, sq, sk, d;
    int64_t q_stride[4], k_stride[4], v_stride[4], o_stride[4];  // elements, for (b, h, s, d)
    float scale;
    int32_t dtype;   // 0 = bf16, 1 = f16
    int32_t causal;  // bottom-right aligned
    int32_t device;
};
}

namespace {

using Key = std::tuple<int, int, int, int, std::vector<int64_t>>;

struct Cache {
    std::mutex lock;
    std::string load_error;
    bool tried = false;
    std::map<int, cudnnHandle_t> handles;
    std::map<Key, std::shared_ptr<fe::graph::Graph>> graphs;
};

Cache &cache() {
    static Cache c;
    return c;
}

void set_err(char *err, size_t len, const std::string &msg) {
    if (err && len) {
        std::snprintf(err, len, "%s", msg.c_str());
    }
}

// Opens libcudnn once; returns an empty string on success.
std::string load(Cache &c) {
    if (!c.tried) {
        c.tried = true;
        const char *names[] = {"libcudnn.so.9", "libcudnn.so"};
        for (const char *n : names) {
            fe::cudnn_dlhandle = dlopen(n, RTLD_NOW | RTLD_GLOBAL);
            if (fe::cudnn_dlhandle) break;
        }
        if (!fe::cudnn_dlhandle) {
            const char *e = dlerror();
            c.load_error = std::string("cannot load libcudnn.so.9: ") + (e ? e : "not found");
        } else {
            try {
                size_t v = fe::detail::get_backend_version();
                if (v < 90300) {
                    c.load_error = "cuDNN " + std::to_string(v) + " is older than 9.3 (bottom-right causal SDPA)";
                }
            } catch (const std::exception &e) {
                c.load_error = std::string("cuDNN: ") + e.what();
            }
        }
    }
    return c.load_error;
}

std::shared_ptr<fe::graph::Graph> build(const ApbSdpa &p, cudnnHandle_t handle, std::string &msg) {
    auto dt = p.dtype == 0 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF;
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(dt).set_intermediate_data_type(fe::DataType_t::FLOAT).set_compute_data_type(
        fe::DataType_t::FLOAT);
    auto tensor = [&](const char *name, int64_t uid, int64_t h, int64_t s, const int64_t *st) {
        return g->tensor(fe::graph::Tensor_attributes()
                             .set_name(name)
                             .set_uid(uid)
                             .set_dim({p.b, h, s, p.d})
                             .set_stride({st[0], st[1], st[2], st[3]}));
    };
    auto q = tensor("Q", 1, p.hq, p.sq, p.q_stride);
    auto k = tensor("K", 2, p.hkv, p.sk, p.k_stride);
    auto v = tensor("V", 3, p.hkv, p.sk, p.v_stride);
    auto attrs = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(p.lse != nullptr).set_attn_scale(
        p.scale);
    // Square blocks: top-left and bottom-right causal are the same mask; top-left is the form
    // PyTorch asks for, so both get the same engine.
    if (p.causal && p.sq == p.sk) attrs.set_causal_mask(true);
    if (p.causal && p.sq != p.sk) attrs.set_causal_mask_bottom_right(true);
    auto [o, stats] = g->sdpa(q, k, v, attrs);
    o->set_output(true).set_uid(4).set_dim({p.b, p.hq, p.sq, p.d}).set_stride(
        {p.o_stride[0], p.o_stride[1], p.o_stride[2], p.o_stride[3]});
    if (p.lse) {
        stats->set_output(true)
            .set_uid(5)
            .set_data_type(fe::DataType_t::FLOAT)
            .set_dim({p.b, p.hq, p.sq, 1})
            .set_stride({p.hq * p.sq, p.sq, 1, 1});
    }
    auto check = [&](fe::error_t e, const char *step) {
        if (e.is_bad()) {
            msg = std::string("cuDNN SDPA ") + step + ": " + e.get_message();
            return false;
        }
        return true;
    };
    if (!check(g->validate(), "validate") || !check(g->build_operation_graph(handle), "operation graph") ||
        !check(g->create_execution_plans({fe::HeurMode_t::A}), "plans") ||
        !check(g->check_support(handle), "support") ||
        !check(g->build_plans(handle, fe::BuildPlanPolicy_t::HEURISTICS_CHOICE), "build")) {
        return nullptr;
    }
    return g;
}

}  // namespace

extern "C" {

// 0 if cuDNN loaded (version >= 9.3), else 1 with the reason in `err`.
int apb_cudnn_available(char *err, size_t len) {
    Cache &c = cache();
    std::lock_guard<std::mutex> guard(c.lock);
    std::string e = load(c);
    if (!e.empty()) {
        set_err(err, len, e);
        return 1;
    }
    return 0;
}

// Runs attention on `p.stream`. Returns 0 on success; 2 if `ws_bytes` is below the workspace the
// plan needs (written to `*ws_needed`; call again with a larger one); 1 on error (message in `err`).
int apb_cudnn_sdpa(const ApbSdpa *p, void *ws, int64_t ws_bytes, int64_t *ws_needed, char *err, size_t len) {
    Cache &c = cache();
    std::lock_guard<std::mutex> guard(c.lock);
    try {
        std::string e = load(c);
        if (!e.empty()) {
            set_err(err, len, e);
            return 1;
        }
        // The caller made `p->device`'s primary context current; the runtime uses it.
        auto hit = c.handles.find(p->device);
        if (hit == c.handles.end()) {
            cudnnHandle_t h;
            if (fe::detail::create_handle(&h) != CUDNN_STATUS_SUCCESS) {
                set_err(err, len, "cudnnCreate failed");
                return 1;
            }
            hit = c.handles.emplace(p->device, h).first;
        }
        cudnnHandle_t handle = hit->second;
        if (fe::detail::set_stream(handle, static_cast<cudaStream_t>(p->stream)) != CUDNN_STATUS_SUCCESS) {
            set_err(err, len, "cudnnSetStream failed");
            return 1;
        }
        std::vector<int64_t> dims = {p->b, p->hq, p->hkv, p->sq, p->sk, p->d};
        for (const int64_t *s : {p->q_stride, p->k_stride, p->v_stride, p->o_stride}) dims.insert(dims.end(), s, s + 4);
        float scale = p->scale;
        int32_t scale_bits;
        std::memcpy(&scale_bits, &scale, 4);
        Key key{p->device, p->dtype, p->causal * 2 + (p->lse != nullptr), scale_bits, dims};
        auto found = c.graphs.find(key);
        if (found == c.graphs.end()) {
            std::string msg;
            auto g = build(*p, handle, msg);
            if (!g) {
                set_err(err, len, msg);
                return 1;
            }
            // Bounded: prefill shapes repeat per layer; decode does not come here.
            if (c.graphs.size() >= 256) c.graphs.clear();
            found = c.graphs.emplace(key, g).first;
        }
        auto &g = found->second;
        int64_t need = 0;
        if (g->get_workspace_size(need).is_bad()) {
            set_err(err, len, "cuDNN SDPA: workspace size");
            return 1;
        }
        *ws_needed = need;
        if (need > ws_bytes) return 2;
        std::unordered_map<int64_t, void *> pack = {{1, p->q}, {2, p->k}, {3, p->v}, {4, p->o}};
        if (p->lse) pack[5] = p->lse;
        auto r = g->execute(handle, pack, ws);
        if (r.is_bad()) {
            set_err(err, len, "cuDNN SDPA execute: " + r.get_message());
            return 1;
        }
        return 0;
    } catch (const std::exception &e) {
        set_err(err, len, std::string("cuDNN SDPA: ") + e.what());
        return 1;
    }
}
}
