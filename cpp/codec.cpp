// dlibbridge codec implementation.  See codec.h and cpp/FORMAT.md.
#include "codec.h"

#include <cctype>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <unordered_map>
#include <utility>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "dlibbridge's codec stores tensor data as little-endian float32 and needs a little-endian host"
#endif

namespace dlibbridge {

namespace {

// ------------------------------------------------------------------------------------
// Schemas: the field list of every details record, by version string.

struct FieldSpec {
    const char* name;
    FieldType type;
    int max_bytes;  // integers: the most magnitude bytes dlib's reader of that C++ type takes
};

constexpr FieldType I = FieldType::Int, U = FieldType::UInt, F32 = FieldType::F32,
                    F64 = FieldType::F64, B = FieldType::Bool, T = FieldType::Tensor,
                    A = FieldType::Alias;

enum class RecordKind { Layer, Input, Loss };

struct Schema {
    RecordKind kind;
    std::vector<FieldSpec> fields;
    bool custom = false;  // loss_mmod_: versioned options record, parsed by hand
};

std::vector<FieldSpec> concat(std::vector<FieldSpec> a, const std::vector<FieldSpec>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
}

const std::map<std::string, Schema>& schemas() {
    static const std::map<std::string, Schema> table = [] {
        std::map<std::string, Schema> m;
        const std::vector<FieldSpec> mult4 = {
            {"learning_rate_multiplier", F64, 0}, {"weight_decay_multiplier", F64, 0},
            {"bias_learning_rate_multiplier", F64, 0}, {"bias_weight_decay_multiplier", F64, 0}};
        const std::vector<FieldSpec> con = concat(
            {{"params", T, 0}, {"num_filters", I, 8}, {"nr", I, 8}, {"nc", I, 8},
             {"stride_y", I, 4}, {"stride_x", I, 4}, {"padding_y", I, 4}, {"padding_x", I, 4},
             {"filters", A, 0}, {"biases", A, 0}},
            mult4);
        m["con_4"] = {RecordKind::Layer, con};
        m["con_5"] = {RecordKind::Layer, concat(con, {{"use_bias", B, 0}})};
        m["con_6"] = {RecordKind::Layer, concat(con, {{"use_bias", B, 0}, {"use_relu", B, 0}})};
        const std::vector<FieldSpec> bn = concat(
            {{"params", T, 0}, {"gamma", A, 0}, {"beta", A, 0}, {"means", T, 0}, {"invstds", T, 0},
             {"running_means", T, 0}, {"running_variances", T, 0}, {"num_updates", U, 8},
             {"running_stats_window_size", U, 8}},
            concat(mult4, {{"eps", F64, 0}}));
        m["bn_con2"] = {RecordKind::Layer, bn};
        m["bn_fc2"] = {RecordKind::Layer, bn};
        const std::vector<FieldSpec> affine = {
            {"params", T, 0}, {"gamma", A, 0}, {"beta", A, 0}, {"mode", I, 4}};
        m["affine_"] = {RecordKind::Layer, affine};
        m["affine_2"] = {RecordKind::Layer, concat(affine, {{"disabled", B, 0}})};
        m["relu_"] = {RecordKind::Layer, {}};
        m["relu_2"] = {RecordKind::Layer, {{"disabled", B, 0}}};
        const std::vector<FieldSpec> pool = {{"nr", I, 8}, {"nc", I, 8}, {"stride_y", I, 4},
                                             {"stride_x", I, 4}, {"padding_y", I, 4}, {"padding_x", I, 4}};
        m["max_pool_2"] = {RecordKind::Layer, pool};
        m["avg_pool_2"] = {RecordKind::Layer, pool};
        for (const char* s : {"add_prev_", "mult_prev_", "multm_prev_", "resize_prev_to_tagged_",
                              "sig_", "htan_", "softmax_", "softmax_all_", "mish_", "gelu_", "silu_"})
            m[s] = {RecordKind::Layer, {}};
        const std::vector<FieldSpec> fc = concat(
            {{"num_outputs", U, 8}, {"num_inputs", U, 8}, {"params", T, 0}, {"weights", A, 0},
             {"biases", A, 0}, {"bias_mode", I, 4}},
            mult4);
        m["fc_2"] = {RecordKind::Layer, fc};
        m["fc_3"] = {RecordKind::Layer, concat(fc, {{"use_bias", B, 0}})};
        m["dropout_"] = {RecordKind::Layer, {{"drop_rate", F32, 0}, {"mask", T, 0}}};
        m["multiply_"] = {RecordKind::Layer, {{"val", F32, 0}}};
        m["prelu_"] = {RecordKind::Layer, {{"params", T, 0}, {"initial_param_value", F32, 0}}};
        m["concat_"] = {RecordKind::Layer, {{"num_tags", U, 8}}};
        m["leaky_relu_"] = {RecordKind::Layer, {{"alpha", F32, 0}}};
        m["elu_"] = {RecordKind::Layer, {{"alpha", F32, 0}}};
        m["clipped_relu_"] = {RecordKind::Layer, {{"ceiling", F32, 0}}};
        m["l2normalize_"] = {RecordKind::Layer, {{"eps", F64, 0}}};

        const std::vector<FieldSpec> avg = {{"avg_red", F32, 0}, {"avg_green", F32, 0}, {"avg_blue", F32, 0}};
        m["input_rgb_image"] = {RecordKind::Input, avg};
        m["input_rgb_image_sized"] = {RecordKind::Input, concat(avg, {{"nr", U, 8}, {"nc", U, 8}})};
        m["input_rgb_image_pyramid"] = {RecordKind::Input, avg};
        m["input_rgb_image_pyramid2"] = {
            RecordKind::Input, concat(avg, {{"pyramid_padding", U, 8}, {"pyramid_outer_padding", U, 8}})};
        m["input_grayscale_image_pyramid"] = {
            RecordKind::Input, {{"pyramid_padding", U, 8}, {"pyramid_outer_padding", U, 8}}};

        m["loss_metric_2"] = {RecordKind::Loss, {{"margin", F32, 0}, {"dist_thresh", F32, 0}}};
        for (const char* s : {"loss_metric_", "loss_multiclass_log_", "loss_binary_log_",
                              "loss_binary_hinge_", "loss_mean_squared_"})
            m[s] = {RecordKind::Loss, {}};
        m["loss_mmod_"] = {RecordKind::Loss, {}, true};
        return m;
    }();
    return table;
}

const Schema* find_schema(const std::string& version) {
    auto it = schemas().find(version);
    return it == schemas().end() ? nullptr : &it->second;
}

// A version string dlib could have written: identifier characters only.
bool looks_like_version_string(const std::string& s) {
    if (s.size() < 4 || s.size() > 64) return false;
    for (unsigned char c : s)
        if (!(std::isalnum(c) || c == '_')) return false;
    return true;
}

// One component of the layer path reported in errors.  Kept as (kind, text, number) so
// that entering a layer costs no string formatting: the path is only rendered on failure.
struct PathPart {
    enum Kind { Text, Field, Layer, Group, Forest } kind;
    const char* text;  // Text, Field: a literal or a string that outlives the part
    uint64_t num;      // Layer, Group, Forest
};

// "loss layer<1> layer<2> ... layer<57> con_4 .params" -> "loss layer<57> con_4.params":
// of a run of nested wrappers only the innermost is worth naming.
std::string join_path(const std::vector<PathPart>& parts) {
    std::string s;
    for (std::size_t i = 0; i < parts.size(); ++i) {
        const PathPart& c = parts[i];
        if (c.kind == PathPart::Layer && i + 1 < parts.size() && parts[i + 1].kind == PathPart::Layer) continue;
        switch (c.kind) {
            case PathPart::Text: s += (s.empty() ? "" : " ") + std::string(c.text); break;
            case PathPart::Field: s += std::string(".") + c.text; break;
            case PathPart::Layer: s += (s.empty() ? "" : " ") + std::string("layer<") + std::to_string(c.num) + ">"; break;
            case PathPart::Group: s += ".group<" + std::to_string(c.num) + ">"; break;
            case PathPart::Forest: s += ".forest<" + std::to_string(c.num) + ">"; break;
        }
    }
    return s;
}

template <class Owner>
struct PathScope {
    PathScope(Owner& o, PathPart part) : o_(o) { o_.path_.push_back(part); }
    PathScope(Owner& o, const char* text) : o_(o) { o_.path_.push_back({PathPart::Text, text, 0}); }
    PathScope(Owner& o, const std::string& text) : o_(o) { o_.path_.push_back({PathPart::Text, text.c_str(), 0}); }
    ~PathScope() { o_.path_.pop_back(); }
    PathScope(const PathScope&) = delete;
    PathScope& operator=(const PathScope&) = delete;
    Owner& o_;
};

PathPart layer_part(uint64_t depth) { return {PathPart::Layer, nullptr, depth}; }
PathPart field_part(const char* name) { return {PathPart::Field, name, 0}; }

// ------------------------------------------------------------------------------------
// Float encoding (dlib float_details): value = mantissa * 2^exponent.

void float_to_pair(double v, int digits, int64_t& mantissa, int64_t& exponent) {
    if (std::isinf(v)) {
        mantissa = 0;
        exponent = v > 0 ? 32000 : 32001;
        return;
    }
    if (std::isnan(v)) {
        mantissa = 0;
        exponent = 32002;
        return;
    }
    int e = 0;
    double m = std::frexp(v, &e);  // exact for float values held in a double
    mantissa = static_cast<int64_t>(std::ldexp(m, digits));
    exponent = static_cast<int64_t>(e) - digits;
    for (int i = 0; i < 8 && (mantissa & 0xFF) == 0; ++i) {
        mantissa >>= 8;  // arithmetic shift (C++20 guarantees, every compiler does)
        exponent += 8;
    }
}

// ------------------------------------------------------------------------------------
// Parser

enum class Ctx : int { Top = 0, Rep = 1 };

struct Alt {
    NodeP node;
    std::size_t end;
};

struct Fail {};  // a parse attempt failed; details are recorded in Parser::furthest_

constexpr int kMaxDepth = kMaxNesting;
constexpr std::size_t kMaxAlts = 64;     // distinct parses kept per (offset, context)
constexpr uint64_t kMaxWork = 20000000;  // guard against pathological backtracking

class Parser {
public:
    Parser(const unsigned char* d, std::size_t n) : d_(d), n_(n) {}

    // Two passes.  dlib writes add_layer version 2 since before any released model, and
    // version 1 only in its oldest files, which then contain no version 2 at all.  Version 1
    // is also the tag/skip version, and allowing both readings everywhere makes the search
    // quadratic; so pass 1 reads v1 as tag/skip/repeat only, and pass 2 (old files, and
    // inputs that failed pass 1) reads add_layers as v1 only.  The error reported is the
    // furthest failure over both passes.
    ModelTree parse_file() {
        for (bool legacy : {false, true}) {
            if (legacy && saw_v2_layer_) break;  // a v2 add_layer parsed: not an old file
            legacy_ = legacy;
            memo_.clear();
            ModelTree tree;
            if (parse_pass(tree)) return tree;
        }
        if (!have_failure_) fail_record(0, "not a dlib DNN model");
        throw CodecError(furthest_msg_, furthest_off_, furthest_path_);
    }

    bool parse_pass(ModelTree& out) {
        std::vector<Alt> tops;
        std::size_t p = 0;
        // (a) a loss wrapper: version 1, then a loss details record.
        try {
            int64_t v = read_int(p, 4, "loss wrapper version");
            if (v == 1 && peek_string_kind(p) == RecordKind::Loss) {
                PathGuard g(*this, "loss");
                std::size_t q = p;
                DetailsP det = parse_details(q, RecordKind::Loss);
                for (const Alt& sub : parse_net(q, Ctx::Top, 1)) {
                    auto node = std::make_shared<Node>();
                    node->kind = NodeKind::Loss;
                    node->version = v;
                    node->details = det;
                    node->subnet = sub.node;
                    tops.push_back({node, sub.end});
                }
            }
        } catch (const Fail&) {
        }
        // (b) a network without a loss layer.
        if (tops.empty()) {
            for (const Alt& a : parse_net(0, Ctx::Top, 0)) tops.push_back(a);
        }
        for (const Alt& a : tops) {
            ModelTree tree;
            tree.net = a.node;
            std::size_t q = a.end;
            try {
                PathGuard g(*this, "trailer");
                while (q < n_) {
                    tree.trailers.push_back(parse_shape_predictor(q));
                }
                out = std::move(tree);
                return true;
            } catch (const Fail&) {
            }
        }
        return false;
    }

private:
    const unsigned char* d_;
    std::size_t n_;
    friend struct PathScope<Parser>;
    using PathGuard = PathScope<Parser>;
    std::vector<PathPart> path_;
    std::unordered_map<uint64_t, std::vector<Alt>> memo_;
    uint64_t work_ = 0;
    bool legacy_ = false;  // pass 2: add_layer is version 1 (see parse_file)
    bool saw_v2_layer_ = false;
    bool have_failure_ = false;
    std::size_t furthest_off_ = 0;
    std::string furthest_msg_, furthest_path_;

    std::string path_string() const { return join_path(path_); }

    void fail_record(std::size_t off, const std::string& msg) {
        if (!have_failure_ || off > furthest_off_ || (off == furthest_off_ && !legacy_)) {
            have_failure_ = true;
            furthest_off_ = off;
            furthest_msg_ = msg;
            furthest_path_ = path_string();
        }
    }

    [[noreturn]] void fail_at(std::size_t off, const std::string& msg) {
        fail_record(off, msg);
        throw Fail{};
    }

    void tick() {
        if (++work_ > kMaxWork)
            throw CodecError("input too ambiguous to parse (backtracking limit reached)", 0, path_string());
    }

    // --- primitives -------------------------------------------------------------------
    void need(std::size_t p, std::size_t k, const char* what) {
        if (p > n_ || k > n_ - p)
            fail_at(p, std::string("truncated: need ") + std::to_string(k) + " byte(s) for " + what +
                           ", " + std::to_string(p > n_ ? 0 : n_ - p) + " left");
    }

    uint64_t read_magnitude(std::size_t& p, int nbytes) {
        uint64_t v = 0;
        for (int i = 0; i < nbytes; ++i) v |= static_cast<uint64_t>(d_[p + 1 + i]) << (8 * i);
        p += 1 + nbytes;
        return v;
    }

    int64_t read_int(std::size_t& p, int max_bytes, const char* what) {
        need(p, 1, what);
        unsigned char c = d_[p];
        int nb = c & 0x0F;
        if (nb == 0 || nb > max_bytes)
            fail_at(p, std::string("bad integer control byte 0x") + hex(c) + " for " + what);
        need(p, 1 + nb, what);
        std::size_t p0 = p;
        uint64_t mag = read_magnitude(p, nb);
        check_canonical(p0, c & 0x7F, mag, what);
        if ((c & 0x80) && mag == 0) fail_at(p0, std::string("non-canonical integer (negative zero) for ") + what);
        const uint64_t limit = max_bytes >= 8 ? static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
                                              : (uint64_t{1} << (8 * max_bytes - 1)) - 1;
        if (mag > limit + ((c & 0x80) ? 1 : 0)) fail_at(p0, std::string("integer out of range for ") + what);
        if (c & 0x80) return mag == uint64_t{1} << 63 ? std::numeric_limits<int64_t>::min() : -static_cast<int64_t>(mag);
        return static_cast<int64_t>(mag);
    }

    uint64_t read_uint(std::size_t& p, int max_bytes, const char* what) {
        need(p, 1, what);
        unsigned char c = d_[p];
        int nb = c & 0x8F;
        if (nb == 0 || nb > max_bytes)
            fail_at(p, std::string("bad unsigned integer control byte 0x") + hex(c) + " for " + what);
        need(p, 1 + nb, what);
        std::size_t p0 = p;
        uint64_t mag = read_magnitude(p, nb);
        check_canonical(p0, c, mag, what);
        return mag;
    }

    // dlib writes the fewest magnitude bytes (at least one) and leaves bits 4-6 clear; we
    // accept only that, so that every accepted file is written back byte for byte.
    void check_canonical(std::size_t p0, unsigned char c, uint64_t mag, const char* what) {
        int nb = c & 0x0F;
        int minimal = 1;
        while (minimal < 8 && (mag >> (8 * minimal)) != 0) ++minimal;
        if ((c & 0x70) != 0 || nb != minimal)
            fail_at(p0, std::string("non-canonical integer encoding for ") + what);
    }

    static std::string hex(unsigned char c) {
        const char* h = "0123456789abcdef";
        return std::string{h[c >> 4], h[c & 15]};
    }

    double read_float(std::size_t& p, FieldType t, const char* what) {
        std::size_t p0 = p;
        need(p, 1, what);
        if ((d_[p] & 0x70) != 0) fail_at(p, std::string("old text float encoding is not supported for ") + what);
        int64_t m = read_int(p, 8, what);
        int64_t e = read_int(p, 2, what);
        if (e >= 32000) {
            if (m != 0) fail_at(p0, std::string("non-canonical special float for ") + what);
            if (e == 32000) return std::numeric_limits<double>::infinity();
            if (e == 32001) return -std::numeric_limits<double>::infinity();
            if (e == 32002) return std::numeric_limits<double>::quiet_NaN();
            fail_at(p0, std::string("unknown special float code for ") + what);
        }
        double v;
        if (t == FieldType::F32)
            v = static_cast<double>(std::ldexp(static_cast<float>(m), static_cast<int>(e)));
        else
            v = std::ldexp(static_cast<double>(m), static_cast<int>(e));
        // Keep only encodings dlib's writer produces, so that writing back is byte-exact.
        int64_t cm, ce;
        float_to_pair(v, t == FieldType::F32 ? 24 : 53, cm, ce);
        if (cm != m || ce != e) fail_at(p0, std::string("non-canonical float encoding for ") + what);
        return v;
    }

    bool read_bool(std::size_t& p, const char* what) {
        need(p, 1, what);
        unsigned char c = d_[p];
        if (c != '0' && c != '1') fail_at(p, std::string("bad bool byte 0x") + hex(c) + " for " + what);
        ++p;
        return c == '1';
    }

    std::string read_string(std::size_t& p, const char* what) {
        uint64_t len = read_uint(p, 8, what);
        need(p, len, what);
        std::string s(reinterpret_cast<const char*>(d_ + p), static_cast<std::size_t>(len));
        p += len;
        return s;
    }

    Tensor read_tensor(std::size_t& p, const char* what) {
        std::size_t p0 = p;
        int64_t v = read_int(p, 4, what);
        if (v != 2) fail_at(p0, std::string("tensor record version ") + std::to_string(v) + " (expected 2) for " + what);
        Tensor t;
        uint64_t count = 1;
        for (int i = 0; i < 4; ++i) {
            std::size_t pd = p;
            t.dims[i] = read_int(p, 8, what);
            if (t.dims[i] < 0) fail_at(pd, std::string("negative tensor dimension for ") + what);
            uint64_t dim = static_cast<uint64_t>(t.dims[i]);
            if (dim != 0 && count > (uint64_t{1} << 62) / dim)
                fail_at(pd, std::string("tensor size overflows for ") + what);
            count *= dim;
        }
        if (count > (n_ - std::min(p, n_)) / 4)
            fail_at(p, std::string("tensor of ") + std::to_string(count) + " floats exceeds the remaining " +
                           std::to_string(n_ - std::min(p, n_)) + " bytes for " + what);
        t.data = d_ + p;
        p += count * 4;
        return t;
    }

    std::array<int64_t, 4> read_alias(std::size_t& p, const char* what) {
        std::size_t p0 = p;
        int64_t v = read_int(p, 4, what);
        if (v != 1) fail_at(p0, std::string("alias_tensor record version ") + std::to_string(v) + " (expected 1) for " + what);
        std::array<int64_t, 4> a{};
        for (int i = 0; i < 4; ++i) {
            std::size_t pd = p;
            a[i] = read_int(p, 8, what);
            if (a[i] < 0) fail_at(pd, std::string("negative alias dimension for ") + what);
        }
        return a;
    }

    // Non-throwing reads for look-ahead only (the real parse re-reads with full checks).
    bool peek_int(std::size_t& p, int64_t& v) const {
        if (p >= n_) return false;
        unsigned char c = d_[p];
        int nb = c & 0x0F;
        if (nb == 0 || nb > 8 || (c & 0x70) || p + 1 + nb > n_) return false;
        uint64_t mag = 0;
        for (int i = 0; i < nb; ++i) mag |= static_cast<uint64_t>(d_[p + 1 + i]) << (8 * i);
        if (mag >> 62) return false;
        p += 1 + nb;
        v = (c & 0x80) ? -static_cast<int64_t>(mag) : static_cast<int64_t>(mag);
        return true;
    }

    bool peek_tensor(std::size_t& p) const {
        int64_t v, dim;
        uint64_t count = 1;
        if (!peek_int(p, v) || v != 2) return false;
        for (int i = 0; i < 4; ++i) {
            if (!peek_int(p, dim) || dim < 0) return false;
            if (dim && count > (uint64_t{1} << 62) / static_cast<uint64_t>(dim)) return false;
            count *= static_cast<uint64_t>(dim);
        }
        if (count > (n_ - p) / 4) return false;
        p += count * 4;
        return true;
    }

    // tensor tensor bool: the start of a tag-on-input record after its input.
    bool looks_like_tag_on_input(std::size_t p) const {
        return peek_tensor(p) && peek_tensor(p) && p < n_ && (d_[p] == '0' || d_[p] == '1');
    }

    bool at_string(std::size_t p) {
        std::string s;
        return peek_string(p, s);
    }

    // An identifier-like string (a version string candidate) at p, without consuming it.
    bool peek_string(std::size_t p, std::string& out) {
        if (p >= n_) return false;
        unsigned char c = d_[p];
        int nb = c & 0x8F;
        if (nb == 0 || nb > 8 || p + 1 + nb > n_) return false;
        std::size_t q = p;
        uint64_t len = read_magnitude(q, nb);
        if (len < 4 || len > 64 || len > n_ - q) return false;
        out.assign(reinterpret_cast<const char*>(d_ + q), static_cast<std::size_t>(len));
        return looks_like_version_string(out);
    }
    // Returns the record kind of a known name at p, or fails with "unknown ..." if it is an
    // identifier-like string no schema knows; Layer is also returned for "no string here"
    // via the `found` flag.
    RecordKind peek_string_kind(std::size_t p, bool* found = nullptr) {
        std::string s;
        if (!peek_string(p, s)) {
            if (found) *found = false;
            return RecordKind::Layer;
        }
        if (found) *found = true;
        const Schema* sc = find_schema(s);
        if (!sc) {
            if (s.rfind("input", 0) == 0) return RecordKind::Input;
            if (s.rfind("loss", 0) == 0) return RecordKind::Loss;
            return RecordKind::Layer;
        }
        return sc->kind;
    }

    // --- details records --------------------------------------------------------------
    DetailsP parse_details(std::size_t& p, RecordKind want) {
        std::size_t p0 = p;
        std::string version = read_string(p, "version string");
        const Schema* sc = find_schema(version);
        if (!sc) {
            if (looks_like_version_string(version))
                fail_at(p0, "unknown " + std::string(want == RecordKind::Input ? "input layer" : want == RecordKind::Loss ? "loss layer" : "layer") +
                                " type '" + version + "'");
            fail_at(p0, "expected a layer details record");
        }
        if (sc->kind != want)
            fail_at(p0, "'" + version + "' is not " + (want == RecordKind::Input ? "an input layer" : want == RecordKind::Loss ? "a loss layer" : "a computational layer") + " here");
        PathGuard g(*this, version);
        auto det = std::make_shared<Details>();
        det->version = version;
        if (sc->custom) {
            parse_mmod_options(p, det->fields);
        } else {
            det->fields.reserve(sc->fields.size());
            for (const FieldSpec& fs : sc->fields) det->fields.push_back(parse_field(p, fs));
        }
        return det;
    }

    Field parse_field(std::size_t& p, const FieldSpec& fs) {
        PathGuard g(*this, field_part(fs.name));
        Field f;
        f.name = fs.name;
        f.type = fs.type;
        switch (fs.type) {
            case FieldType::Int: f.i = read_int(p, fs.max_bytes, fs.name); break;
            case FieldType::UInt: f.u = read_uint(p, fs.max_bytes, fs.name); break;
            case FieldType::F32:
            case FieldType::F64: f.f = read_float(p, fs.type, fs.name); break;
            case FieldType::Bool: f.b = read_bool(p, fs.name); break;
            case FieldType::Byte:
                need(p, 1, fs.name);
                f.i = d_[p++];
                break;
            case FieldType::Str: f.s = read_string(p, fs.name); break;
            case FieldType::Tensor: f.t = read_tensor(p, fs.name); break;
            case FieldType::Alias: f.alias = read_alias(p, fs.name); break;
            case FieldType::Records: fail_at(p, "internal: records field without a custom parser");
        }
        return f;
    }

    void parse_mmod_options(std::size_t& p, Record& out) {
        std::size_t p0 = p;
        out.push_back(parse_field(p, {"version", I, 4}));
        int64_t v = out.back().i;
        if (v < 1 || v > 4) fail_at(p0, "unsupported mmod_options version " + std::to_string(v));
        if (v == 1) {
            out.push_back(parse_field(p, {"detector_width", U, 8}));
            out.push_back(parse_field(p, {"detector_height", U, 8}));
        } else {
            PathGuard g(*this, field_part("detector_windows"));
            Field w;
            w.name = "detector_windows";
            w.type = FieldType::Records;
            uint64_t count = read_uint(p, 8, "detector window count");
            if (count > n_ - p) fail_at(p, "detector window count exceeds the input");
            for (uint64_t i = 0; i < count; ++i) {
                Record r;
                std::size_t pv = p;
                r.push_back(parse_field(p, {"version", I, 4}));
                if (r.back().i != 1 && r.back().i != 2)
                    fail_at(pv, "unsupported detector_window_details version " + std::to_string(r.back().i));
                r.push_back(parse_field(p, {"width", U, 8}));
                r.push_back(parse_field(p, {"height", U, 8}));
                if (r[0].i == 2) r.push_back(parse_field(p, {"label", FieldType::Str, 0}));
                w.records.push_back(std::move(r));
            }
            out.push_back(std::move(w));
        }
        for (const char* name : {"loss_per_false_alarm", "loss_per_missed_target", "truth_match_iou_threshold",
                                 "overlaps_nms_iou_thresh", "overlaps_nms_percent_covered_thresh",
                                 "overlaps_ignore_iou_thresh", "overlaps_ignore_percent_covered_thresh"})
            out.push_back(parse_field(p, {name, F64, 0}));
        if (v >= 3) out.push_back(parse_field(p, {"assume_image_pyramid", FieldType::Byte, 0}));
        if (v >= 4) {
            out.push_back(parse_field(p, {"use_bounding_box_regression", B, 0}));
            out.push_back(parse_field(p, {"bbr_lambda", F64, 0}));
        }
    }

    // --- wrappers ---------------------------------------------------------------------
    const std::vector<Alt>& parse_net(std::size_t off, Ctx ctx, int depth) {
        uint64_t key = (static_cast<uint64_t>(off) << 1) | static_cast<uint64_t>(ctx);
        auto it = memo_.find(key);
        if (it != memo_.end()) return it->second;
        std::vector<Alt> alts;
        {
            PathGuard g(*this, layer_part(depth));
            if (depth > kMaxDepth)
                throw CodecError("network nested deeper than " + std::to_string(kMaxDepth) + " layers", off, path_string());
            try {
                net_alternatives(off, ctx, depth, alts);
            } catch (const Fail&) {
            }
        }
        return memo_.emplace(key, std::move(alts)).first->second;
    }

    void add_alt(std::vector<Alt>& alts, NodeP node, std::size_t end) {
        for (const Alt& a : alts)
            if (a.end == end) return;  // two parses of the same bytes: keep the preferred (first)
        if (alts.size() < kMaxAlts) alts.push_back({std::move(node), end});
    }

    // Each alternative is tried in its own try block: a failure in one must not hide another.
    void net_alternatives(std::size_t off, Ctx ctx, int depth, std::vector<Alt>& alts) {
        tick();
        std::size_t p = off;
        int64_t v = read_int(p, 4, "wrapper version");
        if (v < 1 || v > 3) fail_at(off, "bad layer wrapper version " + std::to_string(v));

        bool is_string = false;
        RecordKind sk = peek_string_kind(p, &is_string);

        // (B)/(D) with a real input layer (only at the top level).
        if (ctx == Ctx::Top && is_string && sk == RecordKind::Input) {
            std::size_t q = p;
            DetailsP input;
            {
                PathGuard g(*this, "input");
                input = parse_details(q, RecordKind::Input);
            }
            try_input_wrappers(v, input, q, alts);
            return;
        }
        if (ctx == Ctx::Rep) try_input_wrappers(v, nullptr, p, alts);  // over repeat_input_layer
        if (is_string) {
            if (ctx == Ctx::Top && sk == RecordKind::Layer) {
                std::size_t q = p;
                parse_details(q, RecordKind::Layer);  // reports an unknown type by its name
                fail_at(p, "layer record with no subnetwork below it");
            }
            if (sk != RecordKind::Layer) fail_at(p, "unexpected record here");
            return;
        }

        // Nested network: add_layer (A), tag/skip (C), repeat (E).
        if (v == 1 || v == 2) {
            try {
                const std::vector<Alt>& subs = parse_net(p, ctx, depth + 1);
                for (const Alt& sub : subs) {
                    if (v == 1) {  // tag or skip: nothing after the subnet (both passes)
                        auto node = std::make_shared<Node>();
                        node->kind = NodeKind::Tag;
                        node->version = 1;
                        node->subnet = sub.node;
                        add_alt(alts, node, sub.end);
                    }
                    if ((v == 1) != legacy_) continue;
                    if (!at_string(sub.end)) {
                        fail_record(sub.end, "expected a layer details record");
                        continue;
                    }
                    try {
                        std::size_t q = sub.end;
                        auto node = std::make_shared<Node>();
                        node->kind = NodeKind::AddLayer;
                        node->version = v;
                        node->subnet = sub.node;
                        PathGuard g(*this, layer_part(depth));
                        node->details = parse_details(q, RecordKind::Layer);
                        PathGuard g2(*this, node->details->version);
                        parse_layer_state(q, *node, v == 2 ? 3 : 2, "params_grad");
                        add_alt(alts, node, q);
                        saw_v2_layer_ = saw_v2_layer_ || v == 2;
                    } catch (const Fail&) {
                    }
                }
            } catch (const Fail&) {
            }
        }
        if (v == 1) {
            try {
                std::size_t q = p;
                uint64_t count = read_uint(q, 8, "repeat count");
                if (count == 0 || count > n_ - q) fail_at(p, "bad repeat group count " + std::to_string(count));
                // Frontier of (groups so far, end offset), deduplicated by end offset.
                std::vector<std::pair<std::vector<NodeP>, std::size_t>> frontier{{{}, q}};
                for (uint64_t gi = 0; gi < count && !frontier.empty(); ++gi) {
                    std::vector<std::pair<std::vector<NodeP>, std::size_t>> next;
                    for (auto& [groups, end] : frontier) {
                        PathGuard g(*this, PathPart{PathPart::Group, nullptr, gi});
                        for (const Alt& ga : parse_net(end, Ctx::Rep, depth + 1)) {
                            bool dup = false;
                            for (auto& nx : next) dup = dup || nx.second == ga.end;
                            if (dup || next.size() >= kMaxAlts) continue;
                            auto gs = groups;
                            gs.push_back(ga.node);
                            next.emplace_back(std::move(gs), ga.end);
                        }
                    }
                    frontier = std::move(next);
                }
                for (auto& [groups, end] : frontier) {
                    for (const Alt& sub : parse_net(end, ctx, depth + 1)) {
                        auto node = std::make_shared<Node>();
                        node->kind = NodeKind::Repeat;
                        node->version = 1;
                        node->groups = groups;
                        node->subnet = sub.node;
                        add_alt(alts, node, sub.end);
                    }
                }
            } catch (const Fail&) {
            }
        }
    }

    // add_layer over an input (B) and tag over an input (D).
    void try_input_wrappers(int64_t v, DetailsP input, std::size_t p, std::vector<Alt>& alts) {
        // Cheap look-ahead before each attempt: a failed attempt costs a C++ exception, and
        // most attempts fail.  A skipped attempt still records where and why.
        if ((v == 2 || v == 3) && !at_string(p)) {
            fail_record(p, "expected a layer details record");
        } else if (v == 2 || v == 3) {
            try {
                std::size_t q = p;
                auto node = std::make_shared<Node>();
                node->kind = NodeKind::InputLayer;
                node->version = v;
                node->input = input;
                node->details = parse_details(q, RecordKind::Layer);
                PathGuard g(*this, node->details->version);
                parse_layer_state(q, *node, 3, "grad_final");
                if (v == 3) {
                    node->has_sef = true;
                    node->sef = read_uint(q, 4, "sample_expansion_factor");
                }
                add_alt(alts, node, q);
            } catch (const Fail&) {
            }
        }
        if ((v == 1 || v == 2) && !looks_like_tag_on_input(p)) {
            fail_record(p, "expected a tensor record");
        } else if (v == 1 || v == 2) {
            try {
                std::size_t q = p;
                PathGuard g(*this, "tag");
                auto node = std::make_shared<Node>();
                node->kind = NodeKind::TagOnInput;
                node->version = v;
                node->input = input;
                node->tensors[0] = read_tensor(q, "cached_output");
                node->tensors[1] = read_tensor(q, "grad_final");
                node->stale = read_bool(q, "gradient_input_is_stale");
                if (v == 2) {
                    node->has_sef = true;
                    node->sef = read_uint(q, 4, "sample_expansion_factor");
                }
                add_alt(alts, node, q);
            } catch (const Fail&) {
            }
        }
    }

    void parse_layer_state(std::size_t& q, Node& node, int ntensors, const char* last) {
        node.flags[0] = read_bool(q, "this_layer_setup_called");
        node.flags[1] = read_bool(q, "gradient_input_is_stale");
        node.flags[2] = read_bool(q, "get_output_and_gradient_input_disabled");
        node.tensors[0] = read_tensor(q, "x_grad");
        node.tensors[1] = read_tensor(q, "cached_output");
        if (ntensors == 3) node.tensors[2] = read_tensor(q, last);
    }

    // --- shape_predictor trailer --------------------------------------------------------
    Matrix read_matrix(std::size_t& p, int& fmt, const char* what) {
        std::size_t p0 = p;
        Matrix m;
        int64_t nr = read_int(p, 8, what), nc = read_int(p, 8, what);
        int this_fmt = (nr < 0 || nc < 0) ? 1 : (nr > 0 || nc > 0) ? 0 : -1;
        if ((nr < 0) != (nc < 0) && nr != 0 && nc != 0) fail_at(p0, std::string("inconsistent matrix header for ") + what);
        if (this_fmt >= 0) {
            if (fmt >= 0 && fmt != this_fmt) fail_at(p0, std::string("mixed old/new matrix formats in ") + what);
            fmt = this_fmt;
        }
        m.nr = nr < 0 ? -nr : nr;
        m.nc = nc < 0 ? -nc : nc;
        if (m.nr != 0 && static_cast<uint64_t>(m.nc) > (n_ - p) / static_cast<uint64_t>(m.nr))
            fail_at(p0, std::string("matrix larger than the input for ") + what);
        uint64_t count = static_cast<uint64_t>(m.nr) * static_cast<uint64_t>(m.nc);
        if (count > (n_ - p) / 4) fail_at(p0, std::string("matrix larger than the input for ") + what);
        m.v.reserve(count);
        for (uint64_t i = 0; i < count; ++i) m.v.push_back(static_cast<float>(read_float(p, FieldType::F32, what)));
        return m;
    }

    uint64_t read_count(std::size_t& p, std::size_t min_item_bytes, const char* what) {
        std::size_t p0 = p;
        uint64_t c = read_uint(p, 8, what);
        if (c > (n_ - p) / min_item_bytes) fail_at(p0, std::string(what) + " exceeds the remaining input");
        return c;
    }

    ShapePredictor parse_shape_predictor(std::size_t& p) {
        PathGuard g(*this, "shape_predictor");
        ShapePredictor sp;
        std::size_t p0 = p;
        const std::string trailing = std::to_string(n_ - p0) + " byte(s) of trailing data after the network (not a shape_predictor)";
        try {
            sp.version = read_int(p, 4, "shape_predictor version");
        } catch (const Fail&) {
            fail_at(p0, trailing);
        }
        if (sp.version != 1) fail_at(p0, trailing);
        int fmt = -1;
        sp.initial_shape = read_matrix(p, fmt, "initial_shape");
        uint64_t ncascades = read_count(p, 2, "forest count");
        for (uint64_t c = 0; c < ncascades; ++c) {
            PathGuard gc(*this, PathPart{PathPart::Forest, nullptr, c});
            std::vector<RegressionTree> forest;
            uint64_t ntrees = read_count(p, 4, "tree count");
            for (uint64_t t = 0; t < ntrees; ++t) {
                RegressionTree tree;
                uint64_t nsplits = read_count(p, 8, "split count");
                tree.split_idx.reserve(2 * nsplits);
                tree.split_thresh.reserve(nsplits);
                for (uint64_t s = 0; s < nsplits; ++s) {
                    tree.split_idx.push_back(read_uint(p, 8, "split idx1"));
                    tree.split_idx.push_back(read_uint(p, 8, "split idx2"));
                    tree.split_thresh.push_back(static_cast<float>(read_float(p, FieldType::F32, "split thresh")));
                }
                tree.n_leaves = read_count(p, 2, "leaf count");
                for (uint64_t l = 0; l < tree.n_leaves; ++l) {
                    std::size_t pl = p;
                    Matrix m = read_matrix(p, fmt, "leaf_values");
                    if (l == 0) {
                        tree.leaf_nr = m.nr;
                        tree.leaf_nc = m.nc;
                    } else if (m.nr != tree.leaf_nr || m.nc != tree.leaf_nc) {
                        fail_at(pl, "leaf matrices of different shapes in one tree are not supported");
                    }
                    tree.leaf_values.insert(tree.leaf_values.end(), m.v.begin(), m.v.end());
                }
                forest.push_back(std::move(tree));
            }
            sp.forests.push_back(std::move(forest));
        }
        uint64_t na = read_count(p, 2, "anchor_idx count");
        for (uint64_t i = 0; i < na; ++i) {
            std::vector<uint64_t> v;
            uint64_t k = read_count(p, 2, "anchor_idx length");
            for (uint64_t j = 0; j < k; ++j) v.push_back(read_uint(p, 8, "anchor_idx"));
            sp.anchor_idx.push_back(std::move(v));
        }
        uint64_t nd = read_count(p, 2, "deltas count");
        for (uint64_t i = 0; i < nd; ++i) {
            std::vector<float> v;
            uint64_t k = read_count(p, 8, "deltas length");
            for (uint64_t j = 0; j < 2 * k; ++j) v.push_back(static_cast<float>(read_float(p, FieldType::F32, "delta")));
            sp.deltas.push_back(std::move(v));
        }
        sp.new_matrix_format = fmt != 0;
        return sp;
    }
};

// ------------------------------------------------------------------------------------
// Writer

class Writer {
public:
    std::string out;

    [[noreturn]] void error(const std::string& msg) { throw CodecError(msg, out.size(), path_string()); }

    void put_uint(uint64_t v) {
        unsigned char buf[9];
        int n = 0;
        do {
            buf[1 + n++] = static_cast<unsigned char>(v & 0xFF);
            v >>= 8;
        } while (v);
        buf[0] = static_cast<unsigned char>(n);
        out.append(reinterpret_cast<char*>(buf), 1 + n);
    }
    void put_int(int64_t v) {
        uint64_t mag = v < 0 ? uint64_t{0} - static_cast<uint64_t>(v) : static_cast<uint64_t>(v);
        std::size_t at = out.size();
        put_uint(mag);
        if (v < 0) out[at] = static_cast<char>(out[at] | 0x80);
    }
    void put_float(double v, FieldType t) {
        if (t == FieldType::F32 && std::isfinite(v) && static_cast<double>(static_cast<float>(v)) != v)
            error("value is not representable as float32");
        int64_t m, e;
        float_to_pair(v, t == FieldType::F32 ? 24 : 53, m, e);
        put_int(m);
        put_int(e);
    }
    void put_bool(bool b) { out.push_back(b ? '1' : '0'); }
    void put_string(const std::string& s) {
        put_uint(s.size());
        out += s;
    }
    void put_tensor(const Tensor& t) {
        put_int(2);
        for (int64_t d : t.dims) {
            if (d < 0) error("negative tensor dimension");
            put_int(d);
        }
        uint64_t c = t.count();
        if (c && !t.data) error("tensor without data");
        if (c) out.append(reinterpret_cast<const char*>(t.data), c * 4);
    }
    void put_alias(const std::array<int64_t, 4>& a) {
        put_int(1);
        for (int64_t d : a) {
            if (d < 0) error("negative alias dimension");
            put_int(d);
        }
    }

    void put_field(const Field& f) {
        switch (f.type) {
            case FieldType::Int: put_int(f.i); break;
            case FieldType::UInt: put_uint(f.u); break;
            case FieldType::F32:
            case FieldType::F64: put_float(f.f, f.type); break;
            case FieldType::Bool: put_bool(f.b); break;
            case FieldType::Byte:
                if (f.i < 0 || f.i > 255) error("byte field out of range");
                out.push_back(static_cast<char>(f.i));
                break;
            case FieldType::Str: put_string(f.s); break;
            case FieldType::Tensor: put_tensor(f.t); break;
            case FieldType::Alias: put_alias(f.alias); break;
            case FieldType::Records:
                put_uint(f.records.size());
                for (const Record& r : f.records)
                    for (const Field& x : r) put_field(x);
                break;
        }
    }

    void put_details(const Details& d, RecordKind want) {
        Path g(*this, d.version);
        const Schema* sc = find_schema(d.version);
        if (!sc) error("unknown version string '" + d.version + "'");
        if (sc->kind != want) error("'" + d.version + "' cannot stand here");
        if (sc->custom) {
            check_mmod(d.fields);
        } else {
            if (d.fields.size() != sc->fields.size())
                error("'" + d.version + "' has " + std::to_string(sc->fields.size()) + " fields, the tree has " +
                      std::to_string(d.fields.size()));
            for (std::size_t i = 0; i < sc->fields.size(); ++i) {
                const FieldSpec& fs = sc->fields[i];
                const Field& f = d.fields[i];
                if (f.name != fs.name || f.type != fs.type)
                    error("field " + std::to_string(i) + " of '" + d.version + "' must be '" + fs.name + "' (" +
                          field_type_name(fs.type) + "), not '" + f.name + "' (" + field_type_name(f.type) + ")");
                check_range(f, fs.max_bytes);
            }
        }
        put_string(d.version);
        for (const Field& f : d.fields) {
            Path gf(*this, field_part(f.name.c_str()));
            put_field(f);
        }
    }

    void check_range(const Field& f, int max_bytes) {
        if (f.type == FieldType::Int && max_bytes == 4 &&
            (f.i > std::numeric_limits<int32_t>::max() || f.i < std::numeric_limits<int32_t>::min()))
            error("field '" + f.name + "' out of range for a 32-bit int");
        if (f.type == FieldType::UInt && max_bytes == 4 && f.u > std::numeric_limits<uint32_t>::max())
            error("field '" + f.name + "' out of range for a 32-bit unsigned int");
    }

    void check_mmod(const Record& r) {
        if (r.empty() || r[0].name != "version" || r[0].type != FieldType::Int || r[0].i < 1 || r[0].i > 4)
            error("loss_mmod_ options must start with an int 'version' in 1..4");
        int64_t v = r[0].i;
        std::vector<std::pair<const char*, FieldType>> want;
        if (v == 1) {
            want = {{"detector_width", U}, {"detector_height", U}};
        } else {
            want = {{"detector_windows", FieldType::Records}};
        }
        for (const char* n : {"loss_per_false_alarm", "loss_per_missed_target", "truth_match_iou_threshold",
                              "overlaps_nms_iou_thresh", "overlaps_nms_percent_covered_thresh",
                              "overlaps_ignore_iou_thresh", "overlaps_ignore_percent_covered_thresh"})
            want.push_back({n, F64});
        if (v >= 3) want.push_back({"assume_image_pyramid", FieldType::Byte});
        if (v >= 4) {
            want.push_back({"use_bounding_box_regression", B});
            want.push_back({"bbr_lambda", F64});
        }
        if (r.size() != want.size() + 1) error("loss_mmod_ options v" + std::to_string(v) + " field count mismatch");
        for (std::size_t i = 0; i < want.size(); ++i)
            if (r[i + 1].name != want[i].first || r[i + 1].type != want[i].second)
                error(std::string("loss_mmod_ options field ") + std::to_string(i + 1) + " must be '" + want[i].first + "'");
        if (v >= 2) {
            for (const Record& w : r[1].records) {
                if (w.size() < 3 || w[0].name != "version" || w[0].type != FieldType::Int || (w[0].i != 1 && w[0].i != 2) ||
                    w.size() != static_cast<std::size_t>(w[0].i == 2 ? 4 : 3) || w[1].type != U || w[2].type != U ||
                    (w[0].i == 2 && w[3].type != FieldType::Str))
                    error("malformed detector window record");
            }
        }
    }

    void put_layer_state(const Node& n, int ntensors) {
        put_bool(n.flags[0]);
        put_bool(n.flags[1]);
        put_bool(n.flags[2]);
        for (int i = 0; i < ntensors; ++i) put_tensor(n.tensors[i]);
    }

    void put_net(const Node& n, bool in_repeat_group, int depth) {
        if (depth > kMaxDepth) error("network nested deeper than " + std::to_string(kMaxDepth) + " layers");
        Path g(*this, layer_part(static_cast<uint64_t>(depth)));
        switch (n.kind) {
            case NodeKind::Loss:
                error("a loss layer can only be the outermost record");
            case NodeKind::AddLayer:
                if (n.version != 1 && n.version != 2) error("add_layer version must be 1 or 2");
                if (!n.subnet || !n.details) error("add_layer without subnet or details");
                put_int(n.version);
                put_net(*n.subnet, in_repeat_group, depth + 1);
                put_details(*n.details, RecordKind::Layer);
                put_layer_state(n, n.version == 2 ? 3 : 2);
                break;
            case NodeKind::InputLayer:
                if (n.version != 2 && n.version != 3) error("input add_layer version must be 2 or 3");
                if (!n.details) error("input add_layer without details");
                put_int(n.version);
                put_input(n.input, in_repeat_group);
                put_details(*n.details, RecordKind::Layer);
                put_layer_state(n, 3);
                if (n.version == 3) put_uint(n.sef);
                break;
            case NodeKind::Tag:
                if (n.version != 1) error("tag/skip version must be 1");
                if (!n.subnet) error("tag without subnet");
                put_int(1);
                put_net(*n.subnet, in_repeat_group, depth + 1);
                break;
            case NodeKind::TagOnInput:
                if (n.version != 1 && n.version != 2) error("tag-on-input version must be 1 or 2");
                put_int(n.version);
                put_input(n.input, in_repeat_group);
                put_tensor(n.tensors[0]);
                put_tensor(n.tensors[1]);
                put_bool(n.stale);
                if (n.version == 2) put_uint(n.sef);
                break;
            case NodeKind::Repeat:
                if (n.version != 1) error("repeat version must be 1");
                if (n.groups.empty()) error("repeat with no groups");
                if (!n.subnet) error("repeat without subnet");
                put_int(1);
                put_uint(n.groups.size());
                for (std::size_t i = 0; i < n.groups.size(); ++i) {
                    Path gg(*this, PathPart{PathPart::Group, nullptr, i});
                    put_net(*n.groups[i], true, depth + 1);
                }
                put_net(*n.subnet, in_repeat_group, depth + 1);
                break;
        }
    }

    void put_input(const DetailsP& input, bool in_repeat_group) {
        if (in_repeat_group) {
            if (input) error("a layer inside a repeat group sits on repeat_input_layer and has no input record");
            return;
        }
        if (!input) error("the bottom layer needs an input record");
        Path g(*this, "input");
        put_details(*input, RecordKind::Input);
    }

    void put_matrix(int64_t nr, int64_t nc, const float* v, bool new_fmt) {
        put_int(new_fmt ? -nr : nr);
        put_int(new_fmt ? -nc : nc);
        for (int64_t i = 0; i < nr * nc; ++i) put_float(v[i], FieldType::F32);
    }

    void put_shape_predictor(const ShapePredictor& sp) {
        Path g(*this, "shape_predictor");
        if (sp.version != 1) error("shape_predictor version must be 1");
        if (static_cast<uint64_t>(sp.initial_shape.nr * sp.initial_shape.nc) != sp.initial_shape.v.size())
            error("initial_shape size mismatch");
        put_int(sp.version);
        put_matrix(sp.initial_shape.nr, sp.initial_shape.nc, sp.initial_shape.v.data(), sp.new_matrix_format);
        put_uint(sp.forests.size());
        for (const auto& forest : sp.forests) {
            put_uint(forest.size());
            for (const RegressionTree& t : forest) {
                if (t.split_idx.size() != 2 * t.split_thresh.size()) error("split arrays disagree in length");
                put_uint(t.split_thresh.size());
                for (std::size_t s = 0; s < t.split_thresh.size(); ++s) {
                    put_uint(t.split_idx[2 * s]);
                    put_uint(t.split_idx[2 * s + 1]);
                    put_float(t.split_thresh[s], FieldType::F32);
                }
                uint64_t per = static_cast<uint64_t>(t.leaf_nr * t.leaf_nc);
                if (t.leaf_values.size() != t.n_leaves * per) error("leaf_values size mismatch");
                put_uint(t.n_leaves);
                for (uint64_t l = 0; l < t.n_leaves; ++l)
                    put_matrix(t.leaf_nr, t.leaf_nc, t.leaf_values.data() + l * per, sp.new_matrix_format);
            }
        }
        put_uint(sp.anchor_idx.size());
        for (const auto& v : sp.anchor_idx) {
            put_uint(v.size());
            for (uint64_t x : v) put_uint(x);
        }
        put_uint(sp.deltas.size());
        for (const auto& v : sp.deltas) {
            if (v.size() % 2) error("deltas must hold (x, y) pairs");
            put_uint(v.size() / 2);
            for (float x : v) put_float(x, FieldType::F32);
        }
    }

private:
    friend struct PathScope<Writer>;
    using Path = PathScope<Writer>;
    std::vector<PathPart> path_;
    std::string path_string() const { return join_path(path_); }
};

}  // namespace

const char* field_type_name(FieldType t) {
    switch (t) {
        case FieldType::Int: return "int";
        case FieldType::UInt: return "uint";
        case FieldType::F32: return "f32";
        case FieldType::F64: return "f64";
        case FieldType::Bool: return "bool";
        case FieldType::Byte: return "byte";
        case FieldType::Str: return "str";
        case FieldType::Tensor: return "tensor";
        case FieldType::Alias: return "alias";
        case FieldType::Records: return "records";
    }
    return "?";
}

bool field_type_from_name(const std::string& s, FieldType& out) {
    for (FieldType t : {FieldType::Int, FieldType::UInt, FieldType::F32, FieldType::F64, FieldType::Bool,
                        FieldType::Byte, FieldType::Str, FieldType::Tensor, FieldType::Alias, FieldType::Records}) {
        if (s == field_type_name(t)) {
            out = t;
            return true;
        }
    }
    return false;
}

uint64_t Tensor::count() const {
    uint64_t c = 1;
    for (int64_t d : dims) c *= static_cast<uint64_t>(d < 0 ? 0 : d);
    return c;
}

ModelTree parse(const unsigned char* data, std::size_t size) {
    Parser p(data, size);
    return p.parse_file();
}

namespace {
// Tensor bytes in a tree, so the output buffer is allocated once.
uint64_t tensor_bytes(const Node& n) {
    uint64_t b = 0;
    for (const DetailsP& d : {n.details, n.input})
        if (d)
            for (const Field& f : d->fields)
                if (f.type == FieldType::Tensor) b += 4 * f.t.count();
    for (const Tensor& t : n.tensors) b += 4 * t.count();
    for (const NodeP& g : n.groups) b += tensor_bytes(*g);
    return b + (n.subnet ? tensor_bytes(*n.subnet) : 0);
}
}  // namespace

std::string serialize(const ModelTree& tree) {
    Writer w;
    if (!tree.net) w.error("empty tree");
    w.out.reserve(tensor_bytes(*tree.net) + (1u << 16));
    const Node& top = *tree.net;
    if (top.kind == NodeKind::Loss) {
        if (top.version != 1) w.error("add_loss_layer version must be 1");
        if (!top.details || !top.subnet) w.error("loss without details or subnet");
        w.put_int(1);
        w.put_details(*top.details, RecordKind::Loss);
        w.put_net(*top.subnet, false, 1);
    } else {
        w.put_net(top, false, 0);
    }
    for (const ShapePredictor& sp : tree.trailers) w.put_shape_predictor(sp);
    return std::move(w.out);
}

}  // namespace dlibbridge
