/* llmopt's stand-in for TVM's src/support/base64.h (not in the wheel): base64 (RFC 4648, with
   padding) streams over another Stream, as the runtime's JSON form of tensors uses. */
#ifndef LLMOPT_SHIM_TVM_SUPPORT_BASE64_H_
#define LLMOPT_SHIM_TVM_SUPPORT_BASE64_H_

#include <tvm/support/io.h>

#include <cstdint>
#include <string>

namespace tvm {
namespace support {

namespace base64 {
static const char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
inline int Decode(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}
}  // namespace base64

/*! \brief Decodes base64 read from `in` (whitespace skipped, '=' ends the data). */
class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* in) : in_(in) {}
  void InitPosition() {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void* ptr, size_t size) final {
    auto* out = static_cast<unsigned char*>(ptr);
    size_t n = 0;
    while (n < size) {
      if (bits_ >= 8) {
        bits_ -= 8;
        out[n++] = static_cast<unsigned char>((acc_ >> bits_) & 0xff);
        continue;
      }
      char c;
      if (done_ || in_->Read(&c, 1) != 1) break;
      if (c == '=') {
        done_ = true;
        break;
      }
      int v = base64::Decode(c);
      if (v < 0) continue;
      acc_ = (acc_ << 6) | static_cast<uint32_t>(v);
      bits_ += 6;
    }
    return n;
  }
  size_t Write(const void*, size_t) final { return 0; }

 private:
  Stream* in_;
  uint32_t acc_ = 0;
  int bits_ = 0;
  bool done_ = false;
};

/*! \brief Encodes what is written as base64 into `out`; call Finish() at the end. */
class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* out) : out_(out) {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void*, size_t) final { return 0; }
  size_t Write(const void* ptr, size_t size) final {
    const auto* in = static_cast<const unsigned char*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      acc_ = (acc_ << 8) | in[i];
      bits_ += 8;
      while (bits_ >= 6) {
        bits_ -= 6;
        Put(base64::kAlphabet[(acc_ >> bits_) & 0x3f]);
      }
    }
    return size;
  }
  void Finish() {
    if (bits_ > 0) {
      Put(base64::kAlphabet[(acc_ << (6 - bits_)) & 0x3f]);
      int pad = bits_ == 2 ? 2 : 1;
      for (int i = 0; i < pad; ++i) Put('=');
      bits_ = 0;
    }
  }

 private:
  void Put(char c) { out_->Write(&c, 1); }
  Stream* out_;
  uint32_t acc_ = 0;
  int bits_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // LLMOPT_SHIM_TVM_SUPPORT_BASE64_H_
