// dlibbridge codec: dlib DNN model bytes <-> a generic record tree.
//
// This layer knows the *grammar* of dlib's serialization (wrapper records, each layer's
// field list per version string, the float/double encodings) and nothing of what a layer
// computes.  It has no Python dependency: bindings.cpp converts the tree to and from
// Python objects, and tools/fuzz drives parse()/serialize() directly.
//
// Byte layout: ../shared/docs/dlib-format.md; what this codec accepts: cpp/FORMAT.md.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace dlibbridge {

// Every malformed input ends in exactly this exception: message, byte offset, layer path.
struct CodecError : std::runtime_error {
    CodecError(const std::string& msg, std::size_t off, std::string p)
        : std::runtime_error(msg), offset(off), path(std::move(p)) {}
    std::size_t offset;
    std::string path;
};

enum class FieldType { Int, UInt, F32, F64, Bool, Byte, Str, Tensor, Alias, Records };

const char* field_type_name(FieldType t);
bool field_type_from_name(const std::string& s, FieldType& out);

// A dlib tensor: 4 dims (num_samples, k, nr, nc) + raw little-endian float32 data.
// `data` is non-owning: it points into the parsed buffer or into caller-owned memory
// while serializing.
struct Tensor {
    std::array<int64_t, 4> dims{{0, 0, 0, 0}};
    const unsigned char* data = nullptr;
    uint64_t count() const;  // number of floats (dims validated at parse time)
};

struct Field;
using Record = std::vector<Field>;

struct Field {
    std::string name;
    FieldType type = FieldType::Int;
    int64_t i = 0;        // Int, Byte
    uint64_t u = 0;       // UInt
    double f = 0;         // F32 (holds the float value exactly), F64
    bool b = false;       // Bool
    std::string s;        // Str
    Tensor t;             // Tensor
    std::array<int64_t, 4> alias{{0, 0, 0, 0}};  // Alias
    std::vector<Record> records;                 // Records
};

struct Details {
    std::string version;
    Record fields;
};
using DetailsP = std::shared_ptr<const Details>;

enum class NodeKind { Loss, AddLayer, InputLayer, Tag, TagOnInput, Repeat };

struct Node;
using NodeP = std::shared_ptr<const Node>;

struct Node {
    NodeKind kind = NodeKind::AddLayer;
    int64_t version = 0;
    DetailsP details;           // Loss, AddLayer, InputLayer
    DetailsP input;             // InputLayer, TagOnInput (null over repeat_input_layer)
    NodeP subnet;               // Loss, AddLayer, Tag, Repeat
    std::vector<NodeP> groups;  // Repeat
    bool flags[3] = {true, true, false};  // setup_called, gradient_input_is_stale, output_disabled
    bool stale = false;                   // TagOnInput
    Tensor tensors[3];          // AddLayer: x_grad, cached_output, params_grad (v2 only)
                                // InputLayer: x_grad, cached_output, grad_final
                                // TagOnInput: cached_output, grad_final
    bool has_sef = false;       // sample_expansion_factor present (InputLayer v3, TagOnInput v2)
    uint64_t sef = 1;
};

struct Matrix {  // dlib::matrix<float> as (rows, cols, values)
    int64_t nr = 0, nc = 0;
    std::vector<float> v;
};

struct RegressionTree {
    std::vector<uint64_t> split_idx;  // 2 per split
    std::vector<float> split_thresh;
    int64_t leaf_nr = 0, leaf_nc = 0;  // common shape of every leaf matrix
    std::vector<float> leaf_values;    // n_leaves * leaf_nr * leaf_nc
    uint64_t n_leaves = 0;
};

struct ShapePredictor {
    int64_t version = 1;
    bool new_matrix_format = true;  // negative dimensions in matrix headers
    Matrix initial_shape;
    std::vector<std::vector<RegressionTree>> forests;
    std::vector<std::vector<uint64_t>> anchor_idx;
    std::vector<std::vector<float>> deltas;  // x,y interleaved
};

struct ModelTree {
    NodeP net;
    std::vector<ShapePredictor> trailers;
};

// Deepest nesting of wrappers accepted (read and write).  dlib's largest shipped network
// nests ~300 deep; each level costs stack in the parser, and Python's conversion must stay
// far from any thread's stack limit, sanitizers included.
constexpr int kMaxNesting = 1000;

// Parse a complete file.  Throws CodecError.
ModelTree parse(const unsigned char* data, std::size_t size);

// Serialize a tree.  Throws CodecError (offset = bytes written so far) on a tree that
// cannot be represented (unknown version string, field list not matching the schema...).
std::string serialize(const ModelTree& tree);

}  // namespace dlibbridge
