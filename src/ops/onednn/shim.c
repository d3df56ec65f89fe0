/*
 * The oneDNN convolution primitives behind the `onednn` feature, as a small C API that Rust
 * binds (src/ops/onednn/mod.rs).
 *
 * Why a C file at all: oneDNN's C API changed shape between major versions (2.x builds an
 * operation descriptor, a public struct, and then a primitive descriptor from it; 3.x takes
 * opaque memory-descriptor handles and creates the primitive descriptor in one call), and
 * the 2.x structs are large and version-specific. Compiled against the installed dnnl.h, this
 * file hides both from Rust: `#if DNNL_VERSION_MAJOR >= 3` picks the calls, and Rust only ever
 * sees an opaque `cf_op` and plain int64 sizes.
 *
 * One `cf_op` is one primitive for one shape (forward, backward-data or backward-weights),
 * created with oneDNN's preferred ("any") layouts, usually blocked (nChw16c on AVX-512,
 * nChw8c on AVX2), plus the reorders between the caller's plain NCHW/OIHW buffers and those
 * layouts. Executing it reorders the inputs in, runs the primitive and reorders the outputs
 * back. The blocked buffers live in a workspace the caller passes and reuses from call to
 * call: allocated per call they were fresh pages every time (tens of MB at batch 128, above
 * glibc's mmap threshold), and the page faults cost more than the reorders themselves.
 * `cf_conv_backward` runs both gradients of a convolution and reorders dY once for the two.
 * In inference a convolution's output can stay in the blocked layout for the next
 * convolution: `cf_op_arg_block` says which layout an argument uses, and
 * `cf_op_execute_blocked` reads or writes such arguments in the caller's buffers directly.
 * An op is not safe to execute from two threads at once (its stream and library scratchpad
 * are its own): the Rust side holds each behind a mutex.
 *
 * An op created with `threads` = 1 is created and run with OpenMP limited to the calling
 * thread (oneDNN sizes its work split when the primitive is created and reads the limit
 * again in every reorder). For a convolution of a few million multiply-adds, waking OpenMP's
 * sleeping threads costs more than the second thread saves (docs/PERFORMANCE.md). OpenMP's
 * functions are looked up at run time, so that the shim links the same whether oneDNN was
 * built on OpenMP, TBB or nothing; without OpenMP the limit is not applied.
 */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__has_include)
#if __has_include(<oneapi/dnnl/dnnl.h>)
#include <oneapi/dnnl/dnnl.h>
#else
#include <dnnl.h>
#endif
#else
#include <oneapi/dnnl/dnnl.h>
#endif

#if DNNL_VERSION_MAJOR >= 3
/* 3.x: memory descriptors are opaque handles, created and destroyed. */
typedef dnnl_memory_desc_t cf_md;
typedef const_dnnl_memory_desc_t cf_cmd;
#define CF_MD(m) (m)
#else
/* 2.x: memory descriptors are structs, initialized in place. */
typedef dnnl_memory_desc_t cf_md;
typedef const dnnl_memory_desc_t *cf_cmd;
#define CF_MD(m) (&(m))
#endif

/* Which primitive a `cf_op` runs. */
enum { CF_FORWARD = 0, CF_BACKWARD_DATA = 1, CF_BACKWARD_WEIGHTS = 2 };

/* The sizes of one convolution, in the order Rust passes them. */
enum {
    S_N, S_C, S_H, S_W, S_O, S_KH, S_KW, S_OH, S_OW,
    S_GROUPS, S_STRIDE, S_DILATION, S_PAD_T, S_PAD_B, S_PAD_L, S_PAD_R, S_COUNT
};

/* One argument of the primitive: the caller's plain buffer and the layout the primitive
 * wants, with the reorder between them (NULL when the two are the same). */
typedef struct {
    int arg;        /* DNNL_ARG_* */
    int is_output;  /* written by the primitive (reordered back after it) */
    int ndims;      /* the argument's dims, for `cf_op_arg_block` */
    dnnl_dims_t dims;
    cf_md plain;    /* the caller's layout (owned) */
    cf_cmd inner;   /* the primitive's layout (owned by the op's primitive descriptor) */
    dnnl_primitive_desc_t reorder_pd;
    dnnl_primitive_t reorder;
} cf_arg;

typedef struct cf_op {
    int threads; /* OpenMP's thread limit for this op, or 0 for the library's default */
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    dnnl_primitive_desc_t hint; /* the forward descriptor a backward one was made from */
    dnnl_primitive_desc_t pd;
    dnnl_primitive_t prim;
    int nargs;
    cf_arg args[4];
} cf_op;

/* Names the step that failed, for the Rust error message. */
#define CHECK(call, step)            \
    do {                             \
        dnnl_status_t s_ = (call);   \
        if (s_ != dnnl_success) {    \
            *where = (step);         \
            return (int)s_;          \
        }                            \
    } while (0)

static dnnl_status_t md_init(cf_md *md, int ndims, const dnnl_dims_t dims,
        dnnl_format_tag_t tag) {
#if DNNL_VERSION_MAJOR >= 3
    return dnnl_memory_desc_create_with_tag(md, ndims, dims, dnnl_f32, tag);
#else
    return dnnl_memory_desc_init_by_tag(md, ndims, dims, dnnl_f32, tag);
#endif
}

static void md_free(cf_md *md) {
#if DNNL_VERSION_MAJOR >= 3
    if (*md) dnnl_memory_desc_destroy(*md);
    *md = NULL;
#else
    (void)md;
#endif
}

/* OpenMP's `omp_get_max_threads` and `omp_set_num_threads`, when oneDNN runs on OpenMP and
 * the process has them (NULL otherwise). Set once by `cf_engine_create`, before any op
 * exists (the Rust side creates the engine once, before its first op), and only read after. */
static int (*omp_get_max_threads_fn)(void);
static void (*omp_set_num_threads_fn)(int);

int cf_engine_create(dnnl_engine_t *engine) {
    if (dnnl_version()->cpu_runtime == DNNL_RUNTIME_OMP) {
        omp_get_max_threads_fn = (int (*)(void))dlsym(RTLD_DEFAULT, "omp_get_max_threads");
        omp_set_num_threads_fn = (void (*)(int))dlsym(RTLD_DEFAULT, "omp_set_num_threads");
        if (!omp_get_max_threads_fn || !omp_set_num_threads_fn)
            omp_get_max_threads_fn = NULL, omp_set_num_threads_fn = NULL;
    }
    return (int)dnnl_engine_create(engine, dnnl_cpu, 0);
}

/* Limits OpenMP to `threads` on the calling thread (OpenMP keeps the limit per thread);
 * returns the limit to restore, or 0 when nothing was changed. */
static int threads_enter(int threads) {
    if (threads <= 0 || !omp_set_num_threads_fn) return 0;
    int before = omp_get_max_threads_fn();
    if (before == threads) return 0;
    omp_set_num_threads_fn(threads);
    return before;
}

static void threads_leave(int before) {
    if (before > 0) omp_set_num_threads_fn(before);
}

/* OpenMP's thread limit on the calling thread, or -1 where the shim applies none (for the
 * tests: an op's limit is undone when it returns). */
int cf_threads_current(void) {
    return omp_get_max_threads_fn ? omp_get_max_threads_fn() : -1;
}

int cf_version(int *major, int *minor, int *patch) {
    const dnnl_version_t *v = dnnl_version();
    *major = (int)v->major;
    *minor = (int)v->minor;
    *patch = (int)v->patch;
    return 0;
}

void cf_op_destroy(cf_op *op) {
    if (!op) return;
    for (int i = 0; i < op->nargs; i++) {
        if (op->args[i].reorder) dnnl_primitive_destroy(op->args[i].reorder);
        if (op->args[i].reorder_pd) dnnl_primitive_desc_destroy(op->args[i].reorder_pd);
        md_free(&op->args[i].plain);
    }
    if (op->prim) dnnl_primitive_destroy(op->prim);
    if (op->pd) dnnl_primitive_desc_destroy(op->pd);
    if (op->hint) dnnl_primitive_desc_destroy(op->hint);
    if (op->stream) dnnl_stream_destroy(op->stream);
    free(op);
}

/* Adds argument `arg` with the caller's plain layout `plain` (taken over by the op) and the
 * primitive's layout queried as (`query`, `index`): the bias is weights argument 1. */
static int add_arg(cf_op *op, int arg, int is_output, cf_md plain, int ndims,
        const int64_t *dims, dnnl_query_t query, int index, const char **where) {
    cf_arg *a = &op->args[op->nargs++];
    a->arg = arg;
    a->is_output = is_output;
    a->ndims = ndims;
    for (int i = 0; i < ndims; i++) a->dims[i] = dims[i];
    a->plain = plain;
    a->inner = dnnl_primitive_desc_query_md(op->pd, query, index);
    if (!a->inner) {
        *where = "querying the primitive's memory layout";
        return (int)dnnl_runtime_error;
    }
    if (dnnl_memory_desc_equal(CF_MD(a->plain), a->inner)) return 0;
    if (is_output) {
        CHECK(dnnl_reorder_primitive_desc_create(&a->reorder_pd, a->inner, op->engine,
                      CF_MD(a->plain), op->engine, NULL),
                "creating the reorder from the blocked layout");
    } else {
        CHECK(dnnl_reorder_primitive_desc_create(&a->reorder_pd, CF_MD(a->plain), op->engine,
                      a->inner, op->engine, NULL),
                "creating the reorder to the blocked layout");
    }
    CHECK(dnnl_primitive_create(&a->reorder, a->reorder_pd), "creating a reorder");
    return 0;
}

/* The four plain descriptors of a convolution (src NCHW, weights OIHW or GOIHW, bias O,
 * dst NCHW) and their "any" twins, which let the primitive pick its layouts. */
typedef struct {
    cf_md src, wei, bias, dst;
    cf_md any_src, any_wei, any_dst;
    dnnl_dims_t strides, dilates, pad_l, pad_r;
    dnnl_dims_t src_dims, wei_dims, bias_dims, dst_dims;
    int wei_ndims;
} cf_descs;

static void descs_free(cf_descs *d) {
    md_free(&d->src); md_free(&d->wei); md_free(&d->bias); md_free(&d->dst);
    md_free(&d->any_src); md_free(&d->any_wei); md_free(&d->any_dst);
}

static int descs_init(cf_descs *d, const int64_t *s, const char **where) {
    dnnl_dims_t src = {s[S_N], s[S_C], s[S_H], s[S_W]};
    dnnl_dims_t dst = {s[S_N], s[S_O], s[S_OH], s[S_OW]};
    dnnl_dims_t bias = {s[S_O]};
    int64_t g = s[S_GROUPS];
    dnnl_dims_t wei = {s[S_O], s[S_C], s[S_KH], s[S_KW]};
    dnnl_dims_t gwei = {g, s[S_O] / g, s[S_C] / g, s[S_KH], s[S_KW]};
    int wnd = g > 1 ? 5 : 4;
    int64_t *wdims = g > 1 ? gwei : wei;
    for (int i = 0; i < 4; i++) d->src_dims[i] = src[i], d->dst_dims[i] = dst[i];
    for (int i = 0; i < wnd; i++) d->wei_dims[i] = wdims[i];
    d->bias_dims[0] = bias[0];
    d->wei_ndims = wnd;
    dnnl_format_tag_t wtag = g > 1 ? dnnl_goihw : dnnl_oihw;
    CHECK(md_init(&d->src, 4, src, dnnl_nchw), "describing the input");
    CHECK(md_init(&d->dst, 4, dst, dnnl_nchw), "describing the output");
    CHECK(md_init(&d->bias, 1, bias, dnnl_a), "describing the bias");
    CHECK(md_init(&d->wei, wnd, wdims, wtag), "describing the kernel");
    CHECK(md_init(&d->any_src, 4, src, dnnl_format_tag_any), "describing the input");
    CHECK(md_init(&d->any_dst, 4, dst, dnnl_format_tag_any), "describing the output");
    CHECK(md_init(&d->any_wei, wnd, wdims, dnnl_format_tag_any), "describing the kernel");
    d->strides[0] = d->strides[1] = s[S_STRIDE];
    /* oneDNN counts dilation from 0 (no gap), Keras and candle from 1. */
    d->dilates[0] = d->dilates[1] = s[S_DILATION] - 1;
    d->pad_l[0] = s[S_PAD_T];
    d->pad_l[1] = s[S_PAD_L];
    d->pad_r[0] = s[S_PAD_B];
    d->pad_r[1] = s[S_PAD_R];
    return 0;
}

/* The forward primitive descriptor: with the bias when `bias`, then a ReLU post-op when
 * `relu`. */
static int forward_pd(dnnl_primitive_desc_t *pd, dnnl_engine_t engine, cf_descs *d,
        int bias, int relu, const char **where) {
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t post = NULL;
    CHECK(dnnl_primitive_attr_create(&attr), "creating the attributes");
    if (relu) {
        dnnl_status_t s = dnnl_post_ops_create(&post);
#if DNNL_VERSION_MAJOR >= 3
        if (s == dnnl_success) s = dnnl_post_ops_append_eltwise(post, dnnl_eltwise_relu, 0.f, 0.f);
#else
        if (s == dnnl_success)
            s = dnnl_post_ops_append_eltwise(post, 1.f, dnnl_eltwise_relu, 0.f, 0.f);
#endif
        if (s == dnnl_success) s = dnnl_primitive_attr_set_post_ops(attr, post);
        if (post) dnnl_post_ops_destroy(post);
        if (s != dnnl_success) {
            dnnl_primitive_attr_destroy(attr);
            *where = "adding the ReLU post-op";
            return (int)s;
        }
    }
    cf_cmd bias_md = bias ? CF_MD(d->bias) : NULL;
#if DNNL_VERSION_MAJOR >= 3
    dnnl_status_t s = dnnl_convolution_forward_primitive_desc_create(pd, engine,
            dnnl_forward_training, dnnl_convolution_direct, d->any_src, d->any_wei, bias_md,
            d->any_dst, d->strides, d->dilates, d->pad_l, d->pad_r, attr);
#else
    dnnl_convolution_desc_t desc;
    dnnl_status_t s = dnnl_dilated_convolution_forward_desc_init(&desc, dnnl_forward_training,
            dnnl_convolution_direct, &d->any_src, &d->any_wei, bias_md, &d->any_dst,
            d->strides, d->dilates, d->pad_l, d->pad_r);
    if (s == dnnl_success) s = dnnl_primitive_desc_create(pd, &desc, attr, engine, NULL);
#endif
    dnnl_primitive_attr_destroy(attr);
    if (s != dnnl_success) *where = "creating the forward convolution";
    return (int)s;
}

/* Creates the op of `kind` for the sizes `s` (S_COUNT values). `bias` adds the bias to the
 * forward op's arguments (or the bias gradient to the backward-weights op's), `relu` a ReLU
 * after the forward convolution; `threads` limits OpenMP while the op is created and run (0:
 * no limit). On failure returns a nonzero oneDNN status and sets `where` to the step that
 * failed; nothing is left allocated. */
int cf_conv_create(cf_op **out, dnnl_engine_t engine, int kind, const int64_t *s, int bias,
        int relu, int threads, const char **where) {
    *out = NULL;
    cf_op *op = calloc(1, sizeof(cf_op));
    if (!op) {
        *where = "allocating the op";
        return (int)dnnl_out_of_memory;
    }
    op->engine = engine;
    op->threads = threads;
    int before = threads_enter(threads);
    cf_descs d = {0};
    int rc = descs_init(&d, s, where);
    /* A backward op is made from the forward one it differentiates (its "hint"), which has
     * neither bias nor ReLU: those gradients are the caller's. */
    int fwd = kind == CF_FORWARD;
    if (rc == 0)
        rc = forward_pd(fwd ? &op->pd : &op->hint, engine, &d, bias && fwd, relu && fwd, where);
    if (rc == 0 && kind == CF_BACKWARD_DATA) {
#if DNNL_VERSION_MAJOR >= 3
        rc = (int)dnnl_convolution_backward_data_primitive_desc_create(&op->pd, engine,
                dnnl_convolution_direct, d.any_src, d.any_wei, d.any_dst, d.strides, d.dilates,
                d.pad_l, d.pad_r, op->hint, NULL);
#else
        dnnl_convolution_desc_t desc;
        rc = (int)dnnl_dilated_convolution_backward_data_desc_init(&desc,
                dnnl_convolution_direct, &d.any_src, &d.any_wei, &d.any_dst, d.strides,
                d.dilates, d.pad_l, d.pad_r);
        if (rc == 0) rc = (int)dnnl_primitive_desc_create(&op->pd, &desc, NULL, engine, op->hint);
#endif
        if (rc) *where = "creating the backward-data convolution";
    }
    if (rc == 0 && kind == CF_BACKWARD_WEIGHTS) {
        cf_cmd bias_md = bias ? CF_MD(d.bias) : NULL;
#if DNNL_VERSION_MAJOR >= 3
        rc = (int)dnnl_convolution_backward_weights_primitive_desc_create(&op->pd, engine,
                dnnl_convolution_direct, d.any_src, d.any_wei, bias_md, d.any_dst, d.strides,
                d.dilates, d.pad_l, d.pad_r, op->hint, NULL);
#else
        dnnl_convolution_desc_t desc;
        rc = (int)dnnl_dilated_convolution_backward_weights_desc_init(&desc,
                dnnl_convolution_direct, &d.any_src, &d.any_wei, bias_md, &d.any_dst,
                d.strides, d.dilates, d.pad_l, d.pad_r);
        if (rc == 0) rc = (int)dnnl_primitive_desc_create(&op->pd, &desc, NULL, engine, op->hint);
#endif
        if (rc) *where = "creating the backward-weights convolution";
    }
    if (rc == 0) {
        rc = (int)dnnl_primitive_create(&op->prim, op->pd);
        if (rc) *where = "creating the convolution primitive";
    }
    if (rc == 0) {
        rc = (int)dnnl_stream_create(&op->stream, engine, dnnl_stream_default_flags);
        if (rc) *where = "creating the stream";
    }
    /* The arguments, in the order `cf_op_execute` takes the caller's buffers; each takes
     * its plain descriptor over from `d` (zeroed there so that `descs_free` skips it). */
#define ARG(a, o, field, nd, q, i)                                                  \
    if (rc == 0) {                                                                  \
        rc = add_arg(op, (a), (o), d.field, (nd), d.field##_dims, (q), (i), where); \
        d.field = (cf_md){0};                                                       \
    }
    switch (kind) {
    case CF_FORWARD: /* x, w, [b], y */
        ARG(DNNL_ARG_SRC, 0, src, 4, dnnl_query_src_md, 0);
        ARG(DNNL_ARG_WEIGHTS, 0, wei, d.wei_ndims, dnnl_query_weights_md, 0);
        if (bias) ARG(DNNL_ARG_BIAS, 0, bias, 1, dnnl_query_weights_md, 1);
        ARG(DNNL_ARG_DST, 1, dst, 4, dnnl_query_dst_md, 0);
        break;
    case CF_BACKWARD_DATA: /* dy, w, dx */
        ARG(DNNL_ARG_DIFF_DST, 0, dst, 4, dnnl_query_diff_dst_md, 0);
        ARG(DNNL_ARG_WEIGHTS, 0, wei, d.wei_ndims, dnnl_query_weights_md, 0);
        ARG(DNNL_ARG_DIFF_SRC, 1, src, 4, dnnl_query_diff_src_md, 0);
        break;
    default: /* x, dy, dw, [db] */
        ARG(DNNL_ARG_SRC, 0, src, 4, dnnl_query_src_md, 0);
        ARG(DNNL_ARG_DIFF_DST, 0, dst, 4, dnnl_query_diff_dst_md, 0);
        ARG(DNNL_ARG_DIFF_WEIGHTS, 1, wei, d.wei_ndims, dnnl_query_diff_weights_md, 0);
        if (bias) ARG(DNNL_ARG_DIFF_BIAS, 1, bias, 1, dnnl_query_diff_weights_md, 1);
        break;
    }
#undef ARG
    descs_free(&d);
    threads_leave(before);
    if (rc) {
        cf_op_destroy(op);
        return rc;
    }
    *out = op;
    return 0;
}

/* Bytes of one blocked buffer, rounded up so that the next one stays 64-byte aligned. */
static size_t blocked_bytes(const cf_arg *a) {
    return (dnnl_memory_desc_get_size(a->inner) + 63) / 64 * 64;
}

/* The workspace `cf_op_execute` needs for the op's blocked buffers (0 when every argument
 * is used in the caller's layout). */
size_t cf_op_workspace_bytes(const cf_op *op) {
    size_t total = 0;
    for (int i = 0; i < op->nargs; i++)
        if (op->args[i].reorder) total += blocked_bytes(&op->args[i]);
    return total;
}

/* The channel block B (8 or 16) when argument `index` of `op` is used in the dense nChw{B}c
 * layout (channel blocks of B innermost, as oneDNN's AVX2 and AVX-512 kernels pick for
 * activations), else 0. An argument in that layout can be handed from one op to the next
 * without the reorders out and in (`cf_op_execute_blocked`). */
int cf_op_arg_block(const cf_op *op, int index) {
    if (index < 0 || index >= op->nargs) return 0;
    const cf_arg *a = &op->args[index];
    if (a->ndims != 4) return 0;
    cf_cmd used = a->reorder ? a->inner : CF_MD(a->plain);
    const int blocks[2] = {8, 16};
    const dnnl_format_tag_t tags[2] = {dnnl_aBcd8b, dnnl_aBcd16b};
    for (int i = 0; i < 2; i++) {
        cf_md md = {0};
        if (md_init(&md, 4, a->dims, tags[i]) != dnnl_success) continue;
        int equal = dnnl_memory_desc_equal(CF_MD(md), used);
        md_free(&md);
        if (equal) return blocks[i];
    }
    return 0;
}

/* Runs `op` on the caller's `buffers` (in the order `cf_conv_create` lists), with the
 * blocked buffers carved from `workspace` (64-byte aligned, `cf_op_workspace_bytes` long).
 * Each argument i in the bit mask `given` is already in the op's own layout at `data[i]`: it
 * is used there, and not reordered (in, or out for an output). Sets `blocked[i]` to where
 * argument i's blocked copy is (NULL if none). */
static int execute(cf_op *op, void *const *buffers, char *workspace, int given,
        void *const *data, void **blocked, const char **where) {
    dnnl_memory_t plain[4] = {0}, inner[4] = {0};
    dnnl_exec_arg_t exec[4] = {{0, NULL}};
    int rc = 0;
    int before = threads_enter(op->threads);
    for (int i = 0; i < op->nargs && rc == 0; i++) {
        cf_arg *a = &op->args[i];
        int is_given = (given >> i) & 1;
        blocked[i] = NULL;
        rc = (int)dnnl_memory_create(&plain[i], CF_MD(a->plain), op->engine, buffers[i]);
        if (rc == 0 && a->reorder) {
            blocked[i] = is_given ? data[i] : workspace;
            if (!is_given) workspace += blocked_bytes(a);
            rc = (int)dnnl_memory_create(&inner[i], a->inner, op->engine, blocked[i]);
        }
        if (rc) {
            *where = "describing a buffer";
            break;
        }
        exec[i].arg = a->arg;
        exec[i].memory = a->reorder ? inner[i] : plain[i];
        if (a->reorder && !a->is_output && !is_given) {
            dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, plain[i]}, {DNNL_ARG_TO, inner[i]}};
            rc = (int)dnnl_primitive_execute(a->reorder, op->stream, 2, r);
            if (rc) *where = "reordering an input to the blocked layout";
        }
    }
    if (rc == 0) {
        rc = (int)dnnl_primitive_execute(op->prim, op->stream, op->nargs, exec);
        if (rc) *where = "running the convolution";
    }
    for (int i = 0; i < op->nargs && rc == 0; i++) {
        cf_arg *a = &op->args[i];
        if (a->reorder && a->is_output && !((given >> i) & 1)) {
            dnnl_exec_arg_t r[2] = {{DNNL_ARG_FROM, inner[i]}, {DNNL_ARG_TO, plain[i]}};
            rc = (int)dnnl_primitive_execute(a->reorder, op->stream, 2, r);
            if (rc) *where = "reordering an output from the blocked layout";
        }
    }
    if (rc == 0) {
        rc = (int)dnnl_stream_wait(op->stream);
        if (rc) *where = "waiting for the stream";
    }
    for (int i = 0; i < op->nargs; i++) {
        if (plain[i]) dnnl_memory_destroy(plain[i]);
        if (inner[i]) dnnl_memory_destroy(inner[i]);
    }
    threads_leave(before);
    return rc;
}

/* `cf_op_execute`, with each argument i in the bit mask `given` in the op's own layout in
 * the caller's buffer (`cf_op_arg_block` says which: the caller checks it first), read or
 * written there without a reorder. */
int cf_op_execute_blocked(cf_op *op, void *const *buffers, int nargs, int given,
        void *workspace, const char **where) {
    void *blocked[4];
    if (nargs != op->nargs) {
        *where = "counting the arguments";
        return (int)dnnl_invalid_arguments;
    }
    return execute(op, buffers, workspace, given, buffers, blocked, where);
}

/* Runs the op on the caller's plain buffers, `nargs` of them in the order `cf_conv_create`
 * lists (inputs read, outputs overwritten), with `workspace` as above; returns when the
 * results are written. */
int cf_op_execute(cf_op *op, void *const *buffers, int nargs, void *workspace,
        const char **where) {
    return cf_op_execute_blocked(op, buffers, nargs, 0, workspace, where);
}

/* Both gradients of one convolution: `data` (a CF_BACKWARD_DATA op: dy, w -> dx) then
 * `weights` (CF_BACKWARD_WEIGHTS without bias: x, dy -> dw). When both want dY in the same
 * blocked layout, it is reordered once and read by both. `workspace` holds
 * `cf_op_workspace_bytes(data) + cf_op_workspace_bytes(weights)`. */
int cf_conv_backward(cf_op *data, cf_op *weights, void *x, void *dy, void *w, void *dx,
        void *dw, void *workspace, const char **where) {
    if (data->nargs != 3 || weights->nargs != 3) {
        *where = "counting the arguments";
        return (int)dnnl_invalid_arguments;
    }
    void *blocked[4];
    void *data_buffers[3] = {dy, w, dx};
    int rc = execute(data, data_buffers, workspace, 0, NULL, blocked, where);
    if (rc) return rc;
    char *rest = (char *)workspace + cf_op_workspace_bytes(data);
    int shared = blocked[0] && weights->args[1].reorder
            && dnnl_memory_desc_equal(data->args[0].inner, weights->args[1].inner);
    void *weights_buffers[3] = {x, dy, dw};
    void *given[3] = {NULL, blocked[0], NULL};
    return execute(weights, weights_buffers, rest, shared ? 1 << 1 : 0, given, blocked, where);
}
