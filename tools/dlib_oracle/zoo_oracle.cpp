// dlib's own forward pass for the other shipped networks, as their authors declare them
// (dlib's dnn_mmod_face_detection_ex.cpp and dnn_mmod_find_cars_ex.cpp, the dlib-models
// README's gender classifier, BAREL's feats_std DenseNet), so tests/test_generic.py can
// compare dlibbridge.generic against dlib itself.
//
//   zoo_oracle forward NET MODEL IMAGES N H W OUT
//
// IMAGES: N raw RGB uint8 images H×W×3.  Each image is run alone (dlib's inference types use
// affine, so batching would not change values).  OUT gets, per image, the input tensor and
// the output tensor of net.subnet(), each as 4 int32 dimensions then float32 data; for the
// mmod nets the input tensor is the tiled pyramid.  For the mmod nets it also prints one
// line per detection: "det IMAGE LEFT TOP RIGHT BOTTOM CONFIDENCE LABEL".
//
//   zoo_oracle mmod_loss MODEL IMAGES N H W TRUTH OUT
//
// dlib's loss_mmod_ on one batch of the face detector: the N images (same size) as one tiled-
// pyramid batch, TRUTH a text file of lines "IMAGE LEFT TOP RIGHT BOTTOM IGNORE" (mmod_rects).
// OUT gets the output tensor of net.subnet(), the gradient loss_mmod_ puts on it, each as 4
// int32 dimensions then float32 data, then the loss value as a float64.
#include <dlib/dnn.h>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

using namespace dlib;

namespace face_mmod {
template <long F, typename S> using con5d = con<F, 5, 5, 2, 2, S>;
template <long F, typename S> using con5 = con<F, 5, 5, 1, 1, S>;
template <typename S> using downsampler = relu<affine<con5d<32, relu<affine<con5d<32, relu<affine<con5d<16, S>>>>>>>>>;
template <typename S> using rcon5 = relu<affine<con5<45, S>>>;
using net_type = loss_mmod<con<1, 9, 9, 1, 1, rcon5<rcon5<rcon5<downsampler<input_rgb_image_pyramid<pyramid_down<6>>>>>>>>;
}

namespace vehicle_mmod {
template <long F, typename S> using con5d = con<F, 5, 5, 2, 2, S>;
template <long F, typename S> using con5 = con<F, 5, 5, 1, 1, S>;
template <typename S> using downsampler = relu<affine<con5d<32, relu<affine<con5d<32, relu<affine<con5d<16, S>>>>>>>>>;
template <typename S> using rcon5 = relu<affine<con5<55, S>>>;
using net_type = loss_mmod<con<1, 9, 9, 1, 1, rcon5<rcon5<rcon5<downsampler<input_rgb_image_pyramid<pyramid_down<6>>>>>>>>;
}

namespace gender {
template <int N, typename S> using conv3 = con<N, 3, 3, 1, 1, S>;
template <int N, typename S> using block = relu<affine<conv3<N, S>>>;
using net_type = loss_multiclass_log<fc<2, multiply<relu<fc<16, multiply<
    avg_pool<2, 2, 2, 2, block<64, block<64, avg_pool<2, 2, 2, 2, block<32, block<32,
    input_rgb_image_sized<32>>>>>>>>>>>>>;
}

namespace densenet {
template <template <typename> class ACT, template <typename> class BN, long k>
struct def {
    template <long num_filters, long ks, int s, typename SUBNET>
    using conp = add_layer<con_<num_filters, ks, ks, s, s, ks / 2, ks / 2>, SUBNET>;
    template <typename INPUT>
    using stem = add_layer<max_pool_<3, 3, 2, 2, 1, 1>, ACT<BN<conp<2 * k, 7, 2, INPUT>>>>;
    template <long num_filters, typename SUBNET>
    using transition = avg_pool<2, 2, 2, 2, con<num_filters, 1, 1, 1, 1, ACT<BN<SUBNET>>>>;
    template <typename SUBNET>
    using dense_layer = concat2<tag1, tag2, tag2<conp<k, 3, 1, ACT<BN<conp<4 * k, 1, 1, ACT<BN<tag1<SUBNET>>>>>>>>>;
    template <size_t n4, size_t n3, size_t n2, size_t n1, typename INPUT>
    using backbone = ACT<BN<
        repeat<n4, dense_layer, transition<k * (2 + n1 + 2 * n2 + 4 * n3) / 8,
        repeat<n3, dense_layer, transition<k * (2 + n1 + 2 * n2) / 4,
        repeat<n2, dense_layer, transition<k * (2 + n1) / 2,
        repeat<n1, dense_layer, stem<INPUT>>>>>>>>>>;
};
using net_type = loss_metric<fc_no_bias<128, avg_pool_everything<
    def<relu, affine, 16>::backbone<8, 12, 6, 3, input_rgb_image>>>>;
}

static void write_tensor(std::ofstream& out, const tensor& t) {
    int32_t dims[4] = {(int32_t)t.num_samples(), (int32_t)t.k(), (int32_t)t.nr(), (int32_t)t.nc()};
    out.write((const char*)dims, sizeof dims);
    out.write((const char*)t.host(), t.size() * sizeof(float));
}

template <typename NET>
static void print_dets(NET&, const matrix<rgb_pixel>&, long) {}

template <typename S>
static void print_dets(loss_mmod<S>& net, const matrix<rgb_pixel>& img, long i) {
    for (auto&& d : net(img))
        std::printf("det %ld %ld %ld %ld %ld %.9g %s\n", i, d.rect.left(), d.rect.top(), d.rect.right(),
                    d.rect.bottom(), d.detection_confidence, d.label.c_str());
}

static std::vector<matrix<rgb_pixel>> read_images(const char* images, long n, long h, long w) {
    std::ifstream in(images, std::ios::binary);
    std::vector<unsigned char> buf(h * w * 3);
    std::vector<matrix<rgb_pixel>> out;
    for (long i = 0; i < n; ++i) {
        in.read((char*)buf.data(), buf.size());
        if (!in) throw std::runtime_error("short image file");
        matrix<rgb_pixel> img(h, w);
        for (long r = 0; r < h; ++r)
            for (long c = 0; c < w; ++c) {
                const unsigned char* p = &buf[(r * w + c) * 3];
                img(r, c) = rgb_pixel(p[0], p[1], p[2]);
            }
        out.push_back(img);
    }
    return out;
}

template <typename NET>
static int forward(const char* model, const char* images, long n, long h, long w, const char* outpath) {
    NET net;
    deserialize(model) >> net;
    std::ofstream out(outpath, std::ios::binary);
    auto imgs = read_images(images, n, h, w);
    for (long i = 0; i < n; ++i) {
        resizable_tensor x;
        net.to_tensor(&imgs[i], &imgs[i] + 1, x);
        net.subnet().forward(x);
        write_tensor(out, x);
        write_tensor(out, net.subnet().get_output());
        print_dets(net, imgs[i], i);
    }
    return 0;
}

static int mmod_loss(const char* model, const char* images, long n, long h, long w, const char* truth_path,
                     const char* outpath) {
    face_mmod::net_type net;
    deserialize(model) >> net;
    auto imgs = read_images(images, n, h, w);
    std::vector<std::vector<mmod_rect>> truth(n);
    std::ifstream tin(truth_path);
    long i, l, t, r, b, ignore;
    while (tin >> i >> l >> t >> r >> b >> ignore) {
        mmod_rect m(rectangle(l, t, r, b));
        m.ignore = ignore != 0;
        truth.at(i).push_back(m);
    }
    resizable_tensor x;
    net.to_tensor(imgs.begin(), imgs.end(), x);
    const double loss = net.compute_loss(x, truth.begin());
    std::ofstream out(outpath, std::ios::binary);
    write_tensor(out, net.subnet().get_output());
    write_tensor(out, net.subnet().get_gradient_input());
    out.write((const char*)&loss, sizeof loss);
    return 0;
}

int main(int argc, char** argv) try {
    if (argc == 9 && std::string(argv[1]) == "mmod_loss")
        return mmod_loss(argv[2], argv[3], std::stol(argv[4]), std::stol(argv[5]), std::stol(argv[6]), argv[7],
                         argv[8]);
    if (argc != 9 || std::string(argv[1]) != "forward") {
        std::cerr << "usage: zoo_oracle forward NET MODEL IMAGES N H W OUT\n"
                     "       zoo_oracle mmod_loss MODEL IMAGES N H W TRUTH OUT\n";
        return 2;
    }
    const std::string net = argv[2];
    const long n = std::stol(argv[5]), h = std::stol(argv[6]), w = std::stol(argv[7]);
    if (net == "face_mmod") return forward<face_mmod::net_type>(argv[3], argv[4], n, h, w, argv[8]);
    if (net == "vehicle_mmod") return forward<vehicle_mmod::net_type>(argv[3], argv[4], n, h, w, argv[8]);
    if (net == "gender") return forward<gender::net_type>(argv[3], argv[4], n, h, w, argv[8]);
    if (net == "densenet") return forward<densenet::net_type>(argv[3], argv[4], n, h, w, argv[8]);
    std::cerr << "unknown NET " << net << "\n";
    return 2;
} catch (std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
}
