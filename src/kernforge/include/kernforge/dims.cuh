// kernforge typed dimensions: index tensors by named dimension, so mix-ups fail to compile.
//
//   KF_DIM(I); KF_DIM(K);                                  // one index type per dimension
//   using A_t = kf::View<float, kf::Axis<I, 16>, kf::Axis<K, 32>>;   // static extents
//   A_t A(ptr);                                            // row-major strides by default
//   A[I(i)][K(k)] = 1.f;                                   // compiles
//   A[K(k)][I(i)] = 1.f;                                   // error: wrong dimension
//   A(K(k), I(i)) = 1.f;                                   // position-free: any order
//   auto t = A.tile<4, 8>(I(bi), K(bk));                   // a 4x8 tile view
//
// Extents and strides are compile-time constants where given (kf::Axis<D, Extent, Stride>) and
// run-time values otherwise (kf::dyn). The default stride, kf::packed, is row-major contiguous:
// the product of the later axes' extents (a constant when they are). kf::Buffer<T, Axes...> is
// storage (e.g. __shared__) with a view. Header-only, no standard library, for NVRTC and nvcc.
// Guide: docs/cuda.md. Generated from Python by kernforge.cuda.dims.
#pragma once

#ifndef KF_HD
#define KF_HD __host__ __device__ __forceinline__
#endif
#define KF_CX __host__ __device__ static constexpr

namespace kf {

using index_t = int;  // an index value (32-bit: cheap arithmetic)
#ifndef KF_OFFSET_T
#define KF_OFFSET_T long long
#endif
using offset_t = KF_OFFSET_T;  // element offsets (64-bit: tensors over 2^31 elements)

constexpr offset_t dyn = -1;     // extent or stride known at run time only
constexpr offset_t packed = -2;  // stride: row-major contiguous from the later axes

// ---- small metaprogramming (no <type_traits> under NVRTC) -------------------------------------
template <class A, class B> struct same { static constexpr bool value = false; };
template <class A> struct same<A, A> { static constexpr bool value = true; };
template <class... Xs> struct always_false { static constexpr bool value = false; };

template <int N, class... Xs> struct at;
template <class X, class... Xs> struct at<0, X, Xs...> { using type = X; };
template <int N, class X, class... Xs> struct at<N, X, Xs...> : at<N - 1, Xs...> {};

template <class D, class... Ds> struct count_of {
  static constexpr int value = (0 + ... + (same<D, Ds>::value ? 1 : 0));
};

// ---- index types -------------------------------------------------------------------------------
// Index<D> is the base of a dimension's index type D (declared with KF_DIM). Arithmetic with
// plain integers or with the same dimension keeps the type; there is no implicit conversion to
// or from int, so an index cannot land on the wrong axis unnoticed.
template <class D>
struct Index {
  index_t v;
  KF_HD constexpr explicit Index(index_t value) : v(value) {}
  KF_HD constexpr index_t value() const { return v; }

  friend KF_HD constexpr D operator+(Index a, index_t b) { return D(a.v + b); }
  friend KF_HD constexpr D operator+(index_t a, Index b) { return D(a + b.v); }
  friend KF_HD constexpr D operator+(Index a, Index b) { return D(a.v + b.v); }
  friend KF_HD constexpr D operator-(Index a, index_t b) { return D(a.v - b); }
  friend KF_HD constexpr D operator-(Index a, Index b) { return D(a.v - b.v); }
  friend KF_HD constexpr D operator*(Index a, index_t b) { return D(a.v * b); }
  friend KF_HD constexpr D operator/(Index a, index_t b) { return D(a.v / b); }
  friend KF_HD constexpr D operator%(Index a, index_t b) { return D(a.v % b); }
  friend KF_HD constexpr bool operator<(Index a, Index b) { return a.v < b.v; }
  friend KF_HD constexpr bool operator<=(Index a, Index b) { return a.v <= b.v; }
  friend KF_HD constexpr bool operator>(Index a, Index b) { return a.v > b.v; }
  friend KF_HD constexpr bool operator>=(Index a, Index b) { return a.v >= b.v; }
  friend KF_HD constexpr bool operator==(Index a, Index b) { return a.v == b.v; }
  friend KF_HD constexpr bool operator!=(Index a, Index b) { return a.v != b.v; }
  // Bounds tests against extents (plain numbers).
  friend KF_HD constexpr bool operator<(Index a, offset_t n) { return a.v < n; }
  friend KF_HD constexpr bool operator>=(Index a, offset_t n) { return a.v >= n; }
  KF_HD D& operator+=(index_t b) { v += b; return static_cast<D&>(*this); }
  KF_HD D& operator-=(index_t b) { v -= b; return static_cast<D&>(*this); }
  KF_HD D& operator++() { ++v; return static_cast<D&>(*this); }
};

template <class D> KF_HD constexpr index_t raw(Index<D> i) { return i.v; }

// KF_DIM(NAME) declares the index type of dimension NAME: NAME(i) is an index along it.
#define KF_DIM(NAME)                                             \
  struct NAME : ::kf::Index<NAME> {                              \
    using ::kf::Index<NAME>::Index;                              \
    __host__ __device__ static constexpr const char* dim_name() { \
      return #NAME;                                              \
    }                                                            \
  }

// ---- axes and shapes ---------------------------------------------------------------------------
template <class D, offset_t Extent = dyn, offset_t Stride = packed>
struct Axis {
  using dim = D;
  static constexpr offset_t extent = Extent;
  static constexpr offset_t stride = Stride;
};

template <int N>
struct Shape {
  offset_t v[N > 0 ? N : 1];
  KF_HD constexpr offset_t operator[](int i) const { return v[i]; }
};

template <class D, class... Axes> struct dim_pos;
template <class D, class A, class... Axes> struct dim_pos<D, A, Axes...> {
  static constexpr int value =
      same<D, typename A::dim>::value ? 0
      : (dim_pos<D, Axes...>::value < 0 ? -1 : 1 + dim_pos<D, Axes...>::value);
};
template <class D> struct dim_pos<D> { static constexpr int value = -1; };

template <class... Axes> struct layout {
  static constexpr int rank = sizeof...(Axes);
  // Static extent of axis N (kf::dyn when run-time).
  template <int N> KF_CX offset_t extent() { return at<N, Axes...>::type::extent; }
  // Static product of extents of axes [N, rank), or dyn if any is run-time.
  template <int N> KF_CX offset_t tail_size() {
    if constexpr (N >= rank) {
      return 1;
    } else {
      constexpr offset_t e = extent<N>();
      constexpr offset_t rest = tail_size<N + 1>();
      return (e < 0 || rest < 0) ? dyn : e * rest;
    }
  }
  // Static stride of axis N, or dyn when it is only known at run time.
  template <int N> KF_CX offset_t stride() {
    constexpr offset_t s = at<N, Axes...>::type::stride;
    if constexpr (s == packed) return tail_size<N + 1>();
    else return s;
  }
  template <int N> KF_CX bool all_static_from() {
    if constexpr (N >= rank) return true;
    else return extent<N>() >= 0 && stride<N>() >= 0 && all_static_from<N + 1>();
  }
  static constexpr bool all_static = all_static_from<0>();
  // Elements spanned by an all-static layout: 1 + sum((extent - 1) * stride).
  template <int N> KF_CX offset_t span_from() {
    if constexpr (N >= rank) return 1;
    else return (extent<N>() - 1) * stride<N>() + span_from<N + 1>();
  }
};

// ---- views -------------------------------------------------------------------------------------
template <class T, class... Axes> struct View;

template <int... Is> struct seq {};
template <int N, int... Is> struct make_seq : make_seq<N - 1, N - 1, Is...> {};
template <int... Is> struct make_seq<0, Is...> { using type = seq<Is...>; };
template <class... Xs> struct list {};
template <offset_t... Vs> struct vals {};

// The view type of a tile: same dimensions and strides (made explicit), static extents Es.
template <class T, class Seq, class Axes, class Es> struct tiled_view;
template <class T, int... Is, class... Axes, offset_t... Es>
struct tiled_view<T, seq<Is...>, list<Axes...>, vals<Es...>> {
  using L = layout<Axes...>;
  using type = View<T, Axis<typename at<Is, Axes...>::type::dim, Es,
                            (L::template stride<Is>() >= 0 ? L::template stride<Is>() : dyn)>...>;
};

template <class T, class A0, class... Rest>
struct View<T, A0, Rest...> {
  using element = T;
  using L = layout<A0, Rest...>;
  static constexpr int rank = L::rank;
  using head_dim = typename A0::dim;
  // A view of the same memory with static tile extents (strides kept).
  template <offset_t E0, offset_t... Es>
  using tiled = typename tiled_view<T, typename make_seq<rank>::type, list<A0, Rest...>,
                                    vals<E0, Es...>>::type;

  T* ptr;
  offset_t ext[rank];  // run-time extents and strides; static ones are constants, not read
  offset_t str[rank];

  // All-static layout: the pointer alone.
  KF_HD explicit View(T* p) : ptr(p) {
    static_assert(L::all_static,
                  "kf::View(ptr) needs static extents and strides; pass extents (and strides)");
    fill_static<0>();
  }
  // Run-time extents (static ones are checked by nobody: the type wins); packed strides.
  KF_HD View(T* p, Shape<rank> extents) : ptr(p) {
    for (int i = 0; i < rank; ++i) ext[i] = extents[i];
    fill_static<0>();
    offset_t s = 1;
    for (int i = rank - 1; i >= 0; --i) {  // packed strides from the actual extents
      if (stride_is_packed(i)) str[i] = s;
      s *= extent_rt(i);
    }
  }
  // Run-time extents and strides (in elements).
  KF_HD View(T* p, Shape<rank> extents, Shape<rank> strides) : ptr(p) {
    for (int i = 0; i < rank; ++i) {
      ext[i] = extents[i];
      str[i] = strides[i];
    }
    fill_static<0>();
  }
  // Internal: from raw arrays (sub-views and tiles).
  struct raw_tag {};
  KF_HD View(T* p, const offset_t* e, const offset_t* s, raw_tag) : ptr(p) {
    for (int i = 0; i < rank; ++i) {
      ext[i] = e[i];
      str[i] = s[i];
    }
    fill_static<0>();
  }

  // Extent and stride of axis N, a constant where static.
  template <int N> KF_HD constexpr offset_t extent_at() const {
    if constexpr (L::template extent<N>() >= 0) return L::template extent<N>();
    else return ext[N];
  }
  template <int N> KF_HD constexpr offset_t stride_at() const {
    if constexpr (L::template stride<N>() >= 0) return L::template stride<N>();
    else return str[N];
  }
  // Extent and stride by dimension: A.extent<I>().
  template <class D> KF_HD constexpr offset_t extent() const {
    constexpr int n = dim_pos<D, A0, Rest...>::value;
    static_assert(n >= 0, "kf::View::extent<D>: D is not a dimension of this view");
    return extent_at<n>();
  }
  template <class D> KF_HD constexpr offset_t stride() const {
    constexpr int n = dim_pos<D, A0, Rest...>::value;
    static_assert(n >= 0, "kf::View::stride<D>: D is not a dimension of this view");
    return stride_at<n>();
  }
  template <class D> static constexpr bool has = dim_pos<D, A0, Rest...>::value >= 0;

  // A[I(i)]: index the first axis with its own dimension; the last axis gives the element.
  KF_HD decltype(auto) operator[](head_dim i) const {
    const offset_t off = offset_t(i.v) * stride_at<0>();
    if constexpr (rank == 1) {
      return (ptr[off]);
    } else {
      return View<T, Rest...>(ptr + off, ext + 1, str + 1,
                              typename View<T, Rest...>::raw_tag{});
    }
  }
  // Anything else (another dimension, a plain int) is a compile error that says so.
  template <class X>
  KF_HD void operator[](X) const {
    static_assert(always_false<X>::value,
                  "kernforge dims: wrong index type for this axis: A[...] takes the index type "
                  "of the view's next dimension (e.g. A[I(i)][K(k)] for a View over I then K); "
                  "wrap plain ints as I(i)");
  }

  // A(K(k), I(i)): one index per dimension, in any order.
  template <class... Ix> KF_HD T& operator()(Ix... ix) const {
    static_assert(sizeof...(Ix) == rank, "kernforge dims: give exactly one index per dimension");
    static_assert((... && (dim_pos<Ix, A0, Rest...>::value >= 0)),
                  "kernforge dims: an index's dimension is not one of this view's");
    static_assert((... && (count_of<Ix, Ix...>::value == 1)),
                  "kernforge dims: a dimension is indexed twice");
    return ptr[(offset_t(0) + ... + (offset_t(ix.v) * this->template stride<Ix>()))];
  }

  // True when every index is inside the extents (for tails): A.contains(I(i), K(k)).
  template <class... Ix> KF_HD bool contains(Ix... ix) const {
    return (... && (ix.v >= 0 && offset_t(ix.v) < this->template extent<Ix>()));
  }

  // The tile of static extents (E0, Es...) at tile coordinates (b0, bs...): elements
  // [b0*E0, (b0+1)*E0) x ... . Coordinates are typed like indices, in axis order.
  template <offset_t E0, offset_t... Es>
  KF_HD tiled<E0, Es...> tile(head_dim b0, typename Rest::dim... bs) const {
    static_assert(sizeof...(Es) == sizeof...(Rest), "kf::View::tile: one extent per axis");
    constexpr offset_t es[rank] = {E0, Es...};
    const index_t bi[rank] = {b0.v, bs.v...};
    offset_t off = 0;
    offset_t s[rank];
    fill_strides<0>(s);
    for (int i = 0; i < rank; ++i) off += offset_t(bi[i]) * es[i] * s[i];
    return tiled<E0, Es...>(ptr + off, es, s, typename tiled<E0, Es...>::raw_tag{});
  }

  KF_HD T* data() const { return ptr; }

 private:
  template <int N> KF_HD void fill_static() {
    if constexpr (N < rank) {
      if constexpr (L::template extent<N>() >= 0) ext[N] = L::template extent<N>();
      if constexpr (L::template stride<N>() >= 0) str[N] = L::template stride<N>();
      fill_static<N + 1>();
    }
  }
  template <int N> KF_HD void fill_strides(offset_t* s) const {
    if constexpr (N < rank) {
      s[N] = stride_at<N>();
      fill_strides<N + 1>(s);
    }
  }
  template <int N = 0> KF_HD static constexpr bool packed_at(int i) {
    if constexpr (N >= rank) return false;
    else return i == N ? at<N, A0, Rest...>::type::stride == packed : packed_at<N + 1>(i);
  }
  KF_HD static constexpr bool stride_is_packed(int i) { return packed_at<0>(i); }
  KF_HD offset_t extent_rt(int i) const { return ext[i]; }
};

// ---- storage -----------------------------------------------------------------------------------
// Buffer<T, Axes...>: an array sized for an all-static layout, e.g.
//   __shared__ kf::Buffer<float, kf::Axis<K, 32, 33>, kf::Axis<I, 32, 1>> tile;  // padded
//   tile[K(k)][I(i)] = ...;
template <class T, class... Axes>
struct Buffer {
  using L = layout<Axes...>;
  static_assert(L::all_static, "kf::Buffer needs static extents and strides");
  static constexpr offset_t size = L::template span_from<0>();
  T data[size];

  KF_HD View<T, Axes...> view() { return View<T, Axes...>(data); }
  template <class X> KF_HD decltype(auto) operator[](X i) { return view()[i]; }
  template <class... Ix> KF_HD T& operator()(Ix... ix) { return view()(ix...); }
};

}  // namespace kf
