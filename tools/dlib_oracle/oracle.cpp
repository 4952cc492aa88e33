// dlib_oracle: dlib's own C++ DNN code, driven from Python tests as ground truth.
//
// Why this exists: the claims dlibbridge makes about dlib's *training* network (that
// `dlibbridge unfreeze` output loads into dlib's bn_con `net_type`, that dlib's trainer runs on
// it, what dlib's batch-norm computes on a batch, what loss_metric_ returns) can only be
// checked against dlib's C++ — the `dlib` Python package exposes none of it.  The program is
// built from dlib's own headers (the PyPI sdist, see build.py) and never used by the package.
//
// The network types are those of dlib's metric-learning example
// (examples/dnn_metric_learning_on_images_ex.cpp: `net_type` with bn_con for training,
// `anet_type` with affine for testing, converted by `anet_type a = net;`), instantiated with
// the face ResNet's levels, filter counts and sized input from dlib's face-recognition
// example, i.e. the training network of dlib_face_recognition_resnet_model_v1.dat.
//
// Images never go through dlib's image loaders: Python writes chips as raw uint8 RGB
// (N x 150 x 150 x 3, row-major), descriptors/embeddings/gradients travel as raw float32.
// Every subcommand prints dlib's exception text and exits 1 on failure.

#include <dlib/dnn.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using namespace dlib;

// ---- network types ------------------------------------------------------------------------

template <template <int, template <typename> class, int, typename> class block, int N,
          template <typename> class BN, typename SUBNET>
using residual = add_prev1<block<N, BN, 1, tag1<SUBNET>>>;

template <template <int, template <typename> class, int, typename> class block, int N,
          template <typename> class BN, typename SUBNET>
using residual_down = add_prev2<avg_pool<2, 2, 2, 2, skip1<tag2<block<N, BN, 2, tag1<SUBNET>>>>>>;

template <int N, template <typename> class BN, int stride, typename SUBNET>
using block = BN<con<N, 3, 3, 1, 1, relu<BN<con<N, 3, 3, stride, stride, SUBNET>>>>>;

template <int N, typename SUBNET> using res = relu<residual<block, N, bn_con, SUBNET>>;
template <int N, typename SUBNET> using ares = relu<residual<block, N, affine, SUBNET>>;
template <int N, typename SUBNET> using res_down = relu<residual_down<block, N, bn_con, SUBNET>>;
template <int N, typename SUBNET> using ares_down = relu<residual_down<block, N, affine, SUBNET>>;

template <typename SUBNET> using level0 = res_down<256, SUBNET>;
template <typename SUBNET> using level1 = res<256, res<256, res_down<256, SUBNET>>>;
template <typename SUBNET> using level2 = res<128, res<128, res_down<128, SUBNET>>>;
template <typename SUBNET> using level3 = res<64, res<64, res<64, res_down<64, SUBNET>>>>;
template <typename SUBNET> using level4 = res<32, res<32, res<32, SUBNET>>>;

template <typename SUBNET> using alevel0 = ares_down<256, SUBNET>;
template <typename SUBNET> using alevel1 = ares<256, ares<256, ares_down<256, SUBNET>>>;
template <typename SUBNET> using alevel2 = ares<128, ares<128, ares_down<128, SUBNET>>>;
template <typename SUBNET> using alevel3 = ares<64, ares<64, ares<64, ares_down<64, SUBNET>>>>;
template <typename SUBNET> using alevel4 = ares<32, ares<32, ares<32, SUBNET>>>;

// training network type
using net_type = loss_metric<fc_no_bias<128, avg_pool_everything<
    level0<level1<level2<level3<level4<
    max_pool<3, 3, 2, 2, relu<bn_con<con<32, 7, 7, 2, 2,
    input_rgb_image_sized<150>>>>>>>>>>>>>;

// testing network type (batch normalisation replaced by fixed affine transforms)
using anet_type = loss_metric<fc_no_bias<128, avg_pool_everything<
    alevel0<alevel1<alevel2<alevel3<alevel4<
    max_pool<3, 3, 2, 2, relu<affine<con<32, 7, 7, 2, 2,
    input_rgb_image_sized<150>>>>>>>>>>>>>;

// ---- raw file I/O -------------------------------------------------------------------------

static std::vector<char> read_all(const std::string& path)
{
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot open " + path);
    return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

static void write_all(const std::string& path, const void* data, size_t bytes)
{
    std::ofstream f(path, std::ios::binary);
    f.write(static_cast<const char*>(data), bytes);
    if (!f) throw std::runtime_error("cannot write " + path);
}

static const long CHIP = 150;

// N x 150 x 150 x 3 uint8 RGB → dlib images; N is implied by the file size.
static std::vector<matrix<rgb_pixel>> read_chips(const std::string& path)
{
    const std::vector<char> raw = read_all(path);
    const size_t per = CHIP * CHIP * 3;
    if (raw.empty() || raw.size() % per != 0)
        throw std::runtime_error(path + ": size " + std::to_string(raw.size()) +
                                 " is not a multiple of 150*150*3");
    std::vector<matrix<rgb_pixel>> out(raw.size() / per);
    const unsigned char* p = reinterpret_cast<const unsigned char*>(raw.data());
    for (auto& img : out)
    {
        img.set_size(CHIP, CHIP);
        for (long r = 0; r < CHIP; ++r)
            for (long c = 0; c < CHIP; ++c, p += 3)
                img(r, c) = rgb_pixel(p[0], p[1], p[2]);
    }
    return out;
}

// Whitespace-separated non-negative integers.
static std::vector<unsigned long> read_labels(const std::string& path)
{
    std::ifstream f(path);
    if (!f) throw std::runtime_error("cannot open " + path);
    std::vector<unsigned long> out;
    unsigned long v;
    while (f >> v) out.push_back(v);
    if (!f.eof()) throw std::runtime_error(path + ": labels must be non-negative integers");
    return out;
}

static void write_descriptors(const std::string& path, const std::vector<matrix<float, 0, 1>>& d)
{
    std::vector<float> flat;
    for (const auto& v : d)
        for (long i = 0; i < v.size(); ++i) flat.push_back(v(i));
    write_all(path, flat.data(), flat.size() * sizeof(float));
}

static long parse_long(const std::string& s, const char* what)
{
    size_t used = 0;
    long v = std::stol(s, &used);
    if (used != s.size()) throw std::runtime_error(std::string("bad ") + what + ": " + s);
    return v;
}

static double parse_double(const std::string& s, const char* what)
{
    size_t used = 0;
    double v = std::stod(s, &used);
    if (used != s.size()) throw std::runtime_error(std::string("bad ") + what + ": " + s);
    return v;
}

// ---- subcommands --------------------------------------------------------------------------

// load NET.dat TYPE — deserialize into net_type ("net") or anet_type ("anet").
static int cmd_load(const std::string& file, const std::string& type)
{
    if (type == "net")
    {
        net_type net;
        deserialize(file) >> net;
        std::cout << "loaded net_type: " << net_type::num_layers << " layers, "
                  << net_type::num_computational_layers << " computational\n";
    }
    else if (type == "anet")
    {
        anet_type net;
        deserialize(file) >> net;
        std::cout << "loaded anet_type: " << anet_type::num_layers << " layers\n";
    }
    else
        throw std::runtime_error("type must be net or anet, not " + type);
    return 0;
}

// embed NET.dat CHIPS.u8 MODE OUT.f32
//   anet       net_type from the file, then `anet_type a = net;` (the example's conversion)
//   anet-file  the file deserialized straight into anet_type (what Python's dlib does)
//   batch      net_type on all chips in one batch: dlib's batch-norm uses batch statistics
//   single     net_type one chip at a time: dlib's batch-norm uses the running statistics
static int cmd_embed(const std::string& file, const std::string& chips, const std::string& mode,
                     const std::string& out)
{
    const auto images = read_chips(chips);
    std::vector<matrix<float, 0, 1>> desc;
    if (mode == "anet-file")
    {
        anet_type a;
        deserialize(file) >> a;
        desc = a(images);
    }
    else
    {
        net_type net;
        deserialize(file) >> net;
        if (mode == "anet")
        {
            anet_type a = net;
            desc = a(images);
        }
        else if (mode == "batch")
            desc = net(images, images.size());
        else if (mode == "single")
            for (const auto& img : images) desc.push_back(net(img));
        else
            throw std::runtime_error("mode must be anet, anet-file, batch or single, not " + mode);
    }
    write_descriptors(out, desc);
    std::cout << "embedded " << desc.size() << " chips (" << mode << ")\n";
    return 0;
}

// train NET.dat CHIPS.u8 LABELS.txt STEPS LR OUT.dat [BATCH]
//   dnn_trainer<net_type> with the example's solver sgd(0.0005, 0.9) and learning rate LR.
//   Each step feeds the next BATCH chips (cycling; default all of them) with their labels.
//   Prints "step i loss L" per step: the trainer's average loss cleared before each step is
//   exactly that step's loss (dlib's running_stats over one value).  Saves net.clean()'d.
static int cmd_train(const std::string& file, const std::string& chips, const std::string& labels_file,
                     long steps, double lr, const std::string& out, long batch)
{
    const auto images = read_chips(chips);
    const auto labels = read_labels(labels_file);
    if (labels.size() != images.size())
        throw std::runtime_error("got " + std::to_string(labels.size()) + " labels for " +
                                 std::to_string(images.size()) + " chips");
    if (batch <= 0 || batch > static_cast<long>(images.size())) batch = images.size();

    net_type net;
    deserialize(file) >> net;
    dnn_trainer<net_type> trainer(net, sgd(0.0005, 0.9));
    trainer.set_learning_rate(lr);
    trainer.be_quiet();

    size_t at = 0;
    for (long s = 0; s < steps; ++s)
    {
        std::vector<matrix<rgb_pixel>> bi;
        std::vector<unsigned long> bl;
        for (long k = 0; k < batch; ++k, at = (at + 1) % images.size())
        {
            bi.push_back(images[at]);
            bl.push_back(labels[at]);
        }
        trainer.clear_average_loss();
        trainer.train_one_step(bi, bl);
        std::printf("step %ld loss %.9g\n", s, trainer.get_average_loss());
        std::fflush(stdout);
    }
    trainer.get_net();
    net.clean();
    serialize(out) << net;
    std::cout << "saved " << out << "\n";
    return 0;
}

// loss_metric_ reads only these four members of its subnetwork; this adapter hands it the
// embeddings directly so the value and gradient come from dlib's own code.
struct embedding_subnet
{
    resizable_tensor output, gradient;
    const tensor& get_output() const { return output; }
    tensor& get_gradient_input() { return gradient; }
    unsigned int sample_expansion_factor() const { return 1; }
};

// loss-metric EMB.f32 LABELS.txt K MARGIN THRESH GRAD_OUT.f32
//   prints "loss L" (dlib's compute_loss_value_and_gradient), writes the N x K gradient.
static int cmd_loss_metric(const std::string& emb_file, const std::string& labels_file, long k,
                           double margin, double thresh, const std::string& grad_out)
{
    const std::vector<char> raw = read_all(emb_file);
    const auto labels = read_labels(labels_file);
    const long n = labels.size();
    if (k <= 0 || static_cast<long>(raw.size()) != n * k * 4)
        throw std::runtime_error(emb_file + ": expected " + std::to_string(n) + " x " +
                                 std::to_string(k) + " float32 values");
    embedding_subnet sub;
    sub.output.set_size(n, k);
    std::memcpy(sub.output.host(), raw.data(), raw.size());
    sub.gradient.set_size(n, k);
    sub.gradient = 0;
    resizable_tensor input(n, 1);  // only its sample count is read
    loss_metric_ loss(static_cast<float>(margin), static_cast<float>(thresh));
    const double value = loss.compute_loss_value_and_gradient(input, labels.begin(), sub);
    write_all(grad_out, sub.gradient.host(), n * k * sizeof(float));
    std::printf("loss %.17g\n", value);
    return 0;
}

static int usage()
{
    std::cerr <<
        "usage:\n"
        "  dlib_oracle load NET.dat net|anet\n"
        "  dlib_oracle embed NET.dat CHIPS.u8 anet|anet-file|batch|single OUT.f32\n"
        "  dlib_oracle train NET.dat CHIPS.u8 LABELS.txt STEPS LR OUT.dat [BATCH]\n"
        "  dlib_oracle loss-metric EMB.f32 LABELS.txt K MARGIN THRESH GRAD_OUT.f32\n";
    return 2;
}

int main(int argc, char** argv)
{
    const std::vector<std::string> a(argv + 1, argv + argc);
    try
    {
        if (a.size() == 3 && a[0] == "load") return cmd_load(a[1], a[2]);
        if (a.size() == 5 && a[0] == "embed") return cmd_embed(a[1], a[2], a[3], a[4]);
        if ((a.size() == 7 || a.size() == 8) && a[0] == "train")
            return cmd_train(a[1], a[2], a[3], parse_long(a[4], "STEPS"), parse_double(a[5], "LR"), a[6],
                             a.size() == 8 ? parse_long(a[7], "BATCH") : 0);
        if (a.size() == 7 && a[0] == "loss-metric")
            return cmd_loss_metric(a[1], a[2], parse_long(a[3], "K"), parse_double(a[4], "MARGIN"),
                                   parse_double(a[5], "THRESH"), a[6]);
        return usage();
    }
    catch (std::exception& e)
    {
        std::cout << "error: " << e.what() << std::endl;
        return 1;
    }
}
