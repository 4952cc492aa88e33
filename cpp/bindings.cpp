// Python bindings of the codec: C++ tree <-> plain Python structures (dicts, tuples,
// numpy arrays).  dlibbridge/codec/tree.py turns those into its public classes; the contract
// is documented in dlibbridge/_codec.pyi.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "codec.h"

namespace py = pybind11;
using namespace dlibbridge;

namespace {

PyObject* g_codec_error = nullptr;

[[noreturn]] void raise_codec_error(const std::string& msg, std::size_t offset, const std::string& path) {
    py::tuple args = py::make_tuple(msg, offset, path);
    PyErr_SetObject(g_codec_error, args.ptr());
    throw py::error_already_set();
}

// ---------------------------------------------------------------- C++ -> Python
py::array_t<float> tensor_to_py(const Tensor& t) {
    py::array_t<float> a({t.dims[0], t.dims[1], t.dims[2], t.dims[3]});
    uint64_t c = t.count();
    if (c) std::memcpy(a.mutable_data(), t.data, c * 4);
    return a;
}

py::str str_to_py(const std::string& s) {
    PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogateescape");
    if (!o) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(o);
}

py::object value_to_py(const Field& f);

py::list record_to_py(const Record& r) {
    py::list out;
    for (const Field& f : r) out.append(py::make_tuple(f.name, field_type_name(f.type), value_to_py(f)));
    return out;
}

py::object value_to_py(const Field& f) {
    switch (f.type) {
        case FieldType::Int:
        case FieldType::Byte: return py::int_(f.i);
        case FieldType::UInt: return py::int_(f.u);
        case FieldType::F32:
        case FieldType::F64: return py::float_(f.f);
        case FieldType::Bool: return py::bool_(f.b);
        case FieldType::Str: return str_to_py(f.s);
        case FieldType::Tensor: return tensor_to_py(f.t);
        case FieldType::Alias: return py::make_tuple(f.alias[0], f.alias[1], f.alias[2], f.alias[3]);
        case FieldType::Records: {
            py::list l;
            for (const Record& r : f.records) l.append(record_to_py(r));
            return l;
        }
    }
    return py::none();
}

py::object details_to_py(const DetailsP& d) {
    if (!d) return py::none();
    return py::make_tuple(d->version, record_to_py(d->fields));
}

py::dict node_to_py(const Node& n) {
    py::dict d;
    d["version"] = n.version;
    switch (n.kind) {
        case NodeKind::Loss:
            d["kind"] = "loss";
            d["details"] = details_to_py(n.details);
            d["subnet"] = node_to_py(*n.subnet);
            break;
        case NodeKind::AddLayer:
        case NodeKind::InputLayer:
            d["kind"] = n.kind == NodeKind::AddLayer ? "add_layer" : "input_layer";
            d["details"] = details_to_py(n.details);
            if (n.kind == NodeKind::AddLayer) {
                d["subnet"] = node_to_py(*n.subnet);
            } else {
                d["input"] = details_to_py(n.input);
                d["sef"] = n.has_sef ? py::object(py::int_(n.sef)) : py::object(py::none());
            }
            d["flags"] = py::make_tuple(n.flags[0], n.flags[1], n.flags[2]);
            d["tensors"] = py::make_tuple(tensor_to_py(n.tensors[0]), tensor_to_py(n.tensors[1]),
                                          tensor_to_py(n.tensors[2]));
            break;
        case NodeKind::Tag:
            d["kind"] = "tag";
            d["subnet"] = node_to_py(*n.subnet);
            break;
        case NodeKind::TagOnInput:
            d["kind"] = "tag_input";
            d["input"] = details_to_py(n.input);
            d["tensors"] = py::make_tuple(tensor_to_py(n.tensors[0]), tensor_to_py(n.tensors[1]));
            d["stale"] = n.stale;
            d["sef"] = n.has_sef ? py::object(py::int_(n.sef)) : py::object(py::none());
            break;
        case NodeKind::Repeat: {
            d["kind"] = "repeat";
            py::list g;
            for (const NodeP& x : n.groups) g.append(node_to_py(*x));
            d["groups"] = g;
            d["subnet"] = node_to_py(*n.subnet);
            break;
        }
    }
    return d;
}

template <class T>
py::array_t<T> vec_to_py(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
    py::array_t<T> a(shape);
    if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
    return a;
}

py::dict sp_to_py(const ShapePredictor& sp) {
    py::dict d;
    d["kind"] = "shape_predictor";
    d["version"] = sp.version;
    d["new_matrix_format"] = sp.new_matrix_format;
    d["initial_shape"] = vec_to_py(sp.initial_shape.v, {sp.initial_shape.nr, sp.initial_shape.nc});
    py::list forests;
    for (const auto& forest : sp.forests) {
        py::list trees;
        for (const RegressionTree& t : forest) {
            py::dict td;
            py::ssize_t ns = static_cast<py::ssize_t>(t.split_thresh.size());
            td["split_idx"] = vec_to_py(t.split_idx, {ns, 2});
            td["split_thresh"] = vec_to_py(t.split_thresh, {ns});
            td["leaf_values"] = vec_to_py(t.leaf_values, {static_cast<py::ssize_t>(t.n_leaves), t.leaf_nr, t.leaf_nc});
            trees.append(td);
        }
        forests.append(trees);
    }
    d["forests"] = forests;
    py::list anchors, deltas;
    for (const auto& v : sp.anchor_idx) anchors.append(vec_to_py(v, {static_cast<py::ssize_t>(v.size())}));
    for (const auto& v : sp.deltas) deltas.append(vec_to_py(v, {static_cast<py::ssize_t>(v.size() / 2), 2}));
    d["anchor_idx"] = anchors;
    d["deltas"] = deltas;
    return d;
}

py::dict parse_py(py::buffer buf) {
    py::buffer_info info = buf.request();
    if (info.itemsize != 1 || info.ndim != 1) throw py::value_error("parse() needs a 1-D bytes-like object");
    ModelTree tree;
    try {
        py::gil_scoped_release nogil;
        tree = parse(static_cast<const unsigned char*>(info.ptr), static_cast<std::size_t>(info.size));
    } catch (const CodecError& e) {
        raise_codec_error(e.what(), e.offset, e.path);
    }
    py::dict out;
    out["net"] = node_to_py(*tree.net);
    py::list tr;
    for (const ShapePredictor& sp : tree.trailers) tr.append(sp_to_py(sp));
    out["trailers"] = tr;
    return out;
}

// ---------------------------------------------------------------- Python -> C++
// numpy arrays referenced by the C++ tree must outlive serialize().
struct Keep {
    std::vector<py::object> arrays;
};

Tensor tensor_from_py(const py::handle& h, Keep& keep) {
    auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(h);
    if (!a) throw std::runtime_error("tensor value is not convertible to a float32 array");
    if (a.ndim() != 4) throw std::runtime_error("tensor value must be 4-D (num_samples, k, nr, nc)");
    Tensor t;
    for (int i = 0; i < 4; ++i) t.dims[i] = a.shape(i);
    t.data = reinterpret_cast<const unsigned char*>(a.data());
    keep.arrays.push_back(a);
    return t;
}

std::string str_from_py(const py::handle& h) {
    PyObject* b = PyUnicode_AsEncodedString(h.ptr(), "utf-8", "surrogateescape");
    if (!b) throw py::error_already_set();
    py::bytes bs = py::reinterpret_steal<py::bytes>(b);
    return std::string(bs);
}

Record record_from_py(const py::handle& h, Keep& keep);

Field field_from_py(const py::handle& item, Keep& keep) {
    py::tuple t = py::reinterpret_borrow<py::tuple>(item);
    if (t.size() != 3) throw std::runtime_error("a field is (name, type, value)");
    Field f;
    f.name = t[0].cast<std::string>();
    std::string tn = t[1].cast<std::string>();
    if (!field_type_from_name(tn, f.type)) throw std::runtime_error("unknown field type '" + tn + "'");
    py::handle v = t[2];
    switch (f.type) {
        case FieldType::Int:
        case FieldType::Byte: f.i = v.cast<int64_t>(); break;
        case FieldType::UInt: f.u = v.cast<uint64_t>(); break;
        case FieldType::F32:
        case FieldType::F64: f.f = v.cast<double>(); break;
        case FieldType::Bool: f.b = v.cast<bool>(); break;
        case FieldType::Str: f.s = str_from_py(v); break;
        case FieldType::Tensor: f.t = tensor_from_py(v, keep); break;
        case FieldType::Alias: {
            auto a = v.cast<std::vector<int64_t>>();
            if (a.size() != 4) throw std::runtime_error("alias must have 4 dimensions");
            for (int i = 0; i < 4; ++i) f.alias[i] = a[i];
            break;
        }
        case FieldType::Records:
            for (py::handle r : v) f.records.push_back(record_from_py(r, keep));
            break;
    }
    return f;
}

Record record_from_py(const py::handle& h, Keep& keep) {
    Record r;
    for (py::handle item : h) r.push_back(field_from_py(item, keep));
    return r;
}

DetailsP details_from_py(const py::handle& h, Keep& keep) {
    if (h.is_none()) return nullptr;
    py::tuple t = py::reinterpret_borrow<py::tuple>(h);
    auto d = std::make_shared<Details>();
    d->version = t[0].cast<std::string>();
    d->fields = record_from_py(t[1], keep);
    return d;
}

NodeP node_from_py(const py::handle& h, Keep& keep, int depth) {
    if (depth > kMaxNesting) throw std::runtime_error("network nested deeper than " + std::to_string(kMaxNesting) + " layers");
    py::dict d = py::reinterpret_borrow<py::dict>(h);
    auto n = std::make_shared<Node>();
    std::string kind = d["kind"].cast<std::string>();
    n->version = d["version"].cast<int64_t>();
    auto flags = [&] {
        py::tuple f = d["flags"];
        for (int i = 0; i < 3; ++i) n->flags[i] = f[i].cast<bool>();
    };
    auto tensors = [&](int count) {
        py::tuple ts = d["tensors"];
        if (static_cast<int>(ts.size()) != count) throw std::runtime_error("wrong number of state tensors");
        for (int i = 0; i < count; ++i) n->tensors[i] = tensor_from_py(ts[i], keep);
    };
    auto sef = [&] {
        py::object s = d["sef"];
        n->has_sef = !s.is_none();
        if (n->has_sef) n->sef = s.cast<uint64_t>();
    };
    if (kind == "loss") {
        n->kind = NodeKind::Loss;
        n->details = details_from_py(d["details"], keep);
        n->subnet = node_from_py(d["subnet"], keep, depth + 1);
    } else if (kind == "add_layer") {
        n->kind = NodeKind::AddLayer;
        n->details = details_from_py(d["details"], keep);
        n->subnet = node_from_py(d["subnet"], keep, depth + 1);
        flags();
        tensors(3);
    } else if (kind == "input_layer") {
        n->kind = NodeKind::InputLayer;
        n->input = details_from_py(d["input"], keep);
        n->details = details_from_py(d["details"], keep);
        flags();
        tensors(3);
        sef();
    } else if (kind == "tag") {
        n->kind = NodeKind::Tag;
        n->subnet = node_from_py(d["subnet"], keep, depth + 1);
    } else if (kind == "tag_input") {
        n->kind = NodeKind::TagOnInput;
        n->input = details_from_py(d["input"], keep);
        tensors(2);
        n->stale = d["stale"].cast<bool>();
        sef();
    } else if (kind == "repeat") {
        n->kind = NodeKind::Repeat;
        for (py::handle g : d["groups"]) n->groups.push_back(node_from_py(g, keep, depth + 1));
        n->subnet = node_from_py(d["subnet"], keep, depth + 1);
    } else {
        throw std::runtime_error("unknown node kind '" + kind + "'");
    }
    return n;
}

template <class T>
std::vector<T> array_from_py(const py::handle& h, std::vector<py::ssize_t>* shape = nullptr) {
    auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(h);
    if (!a) throw std::runtime_error("expected a numeric array");
    if (shape) {
        shape->clear();
        for (py::ssize_t i = 0; i < a.ndim(); ++i) shape->push_back(a.shape(i));
    }
    return std::vector<T>(a.data(), a.data() + a.size());
}

ShapePredictor sp_from_py(const py::handle& h) {
    py::dict d = py::reinterpret_borrow<py::dict>(h);
    ShapePredictor sp;
    sp.version = d["version"].cast<int64_t>();
    sp.new_matrix_format = d["new_matrix_format"].cast<bool>();
    std::vector<py::ssize_t> shape;
    sp.initial_shape.v = array_from_py<float>(d["initial_shape"], &shape);
    if (shape.size() != 2) throw std::runtime_error("initial_shape must be 2-D");
    sp.initial_shape.nr = shape[0];
    sp.initial_shape.nc = shape[1];
    for (py::handle forest : d["forests"]) {
        std::vector<RegressionTree> trees;
        for (py::handle th : forest) {
            py::dict td = py::reinterpret_borrow<py::dict>(th);
            RegressionTree t;
            t.split_idx = array_from_py<uint64_t>(td["split_idx"]);
            t.split_thresh = array_from_py<float>(td["split_thresh"]);
            t.leaf_values = array_from_py<float>(td["leaf_values"], &shape);
            if (shape.size() != 3) throw std::runtime_error("leaf_values must be 3-D (leaves, rows, cols)");
            t.n_leaves = static_cast<uint64_t>(shape[0]);
            t.leaf_nr = shape[1];
            t.leaf_nc = shape[2];
            trees.push_back(std::move(t));
        }
        sp.forests.push_back(std::move(trees));
    }
    for (py::handle a : d["anchor_idx"]) sp.anchor_idx.push_back(array_from_py<uint64_t>(a));
    for (py::handle a : d["deltas"]) sp.deltas.push_back(array_from_py<float>(a));
    return sp;
}

py::bytes serialize_py(py::dict raw) {
    Keep keep;
    ModelTree tree;
    std::string out;
    try {
        tree.net = node_from_py(raw["net"], keep, 0);
        for (py::handle t : raw["trailers"]) tree.trailers.push_back(sp_from_py(t));
    } catch (const py::error_already_set&) {
        throw;
    } catch (const std::exception& e) {
        raise_codec_error(std::string("malformed tree: ") + e.what(), 0, "");
    }
    try {
        py::gil_scoped_release nogil;
        out = serialize(tree);
    } catch (const CodecError& e) {
        raise_codec_error(e.what(), e.offset, e.path);
    }
    return py::bytes(out);
}

}  // namespace

PYBIND11_MODULE(_codec, m) {
    m.doc() = "dlibbridge's private codec: dlib DNN bytes <-> plain Python structures";
    g_codec_error = PyErr_NewExceptionWithDoc("dlibbridge._codec.CodecError",
                                              "args = (message, byte offset, layer path)", PyExc_ValueError, nullptr);
    m.attr("CodecError") = py::handle(g_codec_error);
    m.def("parse", &parse_py, py::arg("data"), "Parse a whole dlib DNN file into plain structures.");
    m.def("serialize", &serialize_py, py::arg("tree"), "Serialize plain structures back to dlib's bytes.");
}
