// libFuzzer target for the codec (cpp/codec.cpp), built with ASan + UBSan.
//
// Property checked on every input: parse() either throws CodecError or returns a tree
// that serialize() writes back to exactly the same bytes (the codec accepts only canonical
// encodings, so "accepted" must mean "represented losslessly").  Any other exception,
// crash, sanitizer report, leak or time-out is a finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    dlibbridge::ModelTree tree;
    try {
        tree = dlibbridge::parse(data, size);
    } catch (const dlibbridge::CodecError&) {
        return 0;
    }
    std::string out = dlibbridge::serialize(tree);
    if (out.size() != size || std::memcmp(out.data(), data, size) != 0) {
        std::fprintf(stderr, "round trip mismatch: %zu bytes in, %zu bytes out\n", size, out.size());
        std::abort();
    }
    return 0;
}
