/* llmopt's stand-in for TVM's src/support/bytes_io.h (not in the wheel): Streams over bytes in
   memory. */
#ifndef LLMOPT_SHIM_TVM_SUPPORT_BYTES_IO_H_
#define LLMOPT_SHIM_TVM_SUPPORT_BYTES_IO_H_

#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

/*! \brief Reads from a copy of the bytes it is given. */
class BytesInStream : public Stream {
 public:
  explicit BytesInStream(const std::string& data) : data_(data) {}
  explicit BytesInStream(const ffi::Bytes& data) : data_(data.data(), data.size()) {}
  explicit BytesInStream(const ffi::String& data) : data_(data.data(), data.size()) {}
  BytesInStream(const void* data, size_t size) : data_(static_cast<const char*>(data), size) {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void* ptr, size_t size) final {
    size_t n = std::min(size, data_.size() - pos_);
    if (n != 0) std::memcpy(ptr, data_.data() + pos_, n);
    pos_ += n;
    return n;
  }
  size_t Write(const void*, size_t) final { return 0; }

 private:
  std::string data_;
  size_t pos_ = 0;
};

/*! \brief Appends what is written to a string. */
class BytesOutStream : public Stream {
 public:
  explicit BytesOutStream(std::string* out) : out_(out) {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void*, size_t) final { return 0; }
  size_t Write(const void* ptr, size_t size) final {
    out_->append(static_cast<const char*>(ptr), size);
    return size;
  }

 private:
  std::string* out_;
};

}  // namespace support
}  // namespace tvm

#endif  // LLMOPT_SHIM_TVM_SUPPORT_BYTES_IO_H_
