"""A 16-lane float32 vector type for numba, and the few operations the matrix-vector kernels need.

numba has no SIMD type, and LLVM cannot vectorise a bitmask decode by itself: the packed-value pointer moves
by a popcount at every step. So this module gives numba a ``<16 x float>`` type and emits each operation as a
*generic* LLVM intrinsic (``llvm.masked.expandload``, ``llvm.masked.gather``, ``llvm.fmuladd``, ...). On
AVX-512 they become single instructions (``vexpandps``, ``vpexpandw``/``vpexpandb`` with VBMI2,
``vgatherdps``, ``vfmadd``); on other CPUs LLVM lowers them to scalar code that computes the same thing, slower.

One decode step turns 64 columns of a row (one mask word) into four vectors. See ``lane_columns`` for the
order of the columns in those vectors.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
CHUNK = 64  # columns per decode step

_I1, _I8, _I16, _I32, _I64 = (ir.IntType(n) for n in (1, 8, 16, 32, 64))
_F32 = ir.FloatType()
_V16F = ir.VectorType(_F32, LANES)
_V16I = ir.VectorType(_I32, LANES)


class F32x16(types.Type):
    """numba type of a ``<16 x float>`` held in a register."""

    def __init__(self) -> None:
        super().__init__(name="f32x16")


class I32x16(types.Type):
    """numba type of a ``<16 x i32>`` held in a register (also: 64 int8 or uint8 values, 4 per lane)."""

    def __init__(self) -> None:
        super().__init__(name="i32x16")


f32x16 = F32x16()
i32x16 = I32x16()
_chunk = types.UniTuple(f32x16, 4)


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16F)


@register_model(I32x16)
class _I32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16I)


def lane_columns(dtype) -> np.ndarray:
    """int64 [64]: the chunk column held by decoded vector k, lane d, listed at position 16·k + d.

    fp32 decodes in column order. bf16 decodes 32 columns at a time into 32-bit lanes that hold a word pair
    (2d, 2d + 1), so one shift and one AND give the even and the odd columns. int8 decodes 64 columns into
    32-bit lanes that hold bytes 4d..4d + 3, and shifts give byte k of every lane. The kernels read x in this
    order rather than shuffling weights: x is copied once per call, the weights are streamed once."""
    dtype = np.dtype(dtype)
    k, d = np.divmod(np.arange(CHUNK), LANES)
    if dtype == np.float32:
        return np.arange(CHUNK)
    if dtype == np.uint16:
        return 32 * (k // 2) + 2 * d + k % 2
    if dtype == np.int8:
        return 4 * d + k
    raise TypeError(f"no lane order for {dtype}")


# --- LLVM IR helpers -------------------------------------------------------------------------------------------

def _data_ptr(context, builder, arrty, arr, index):
    """Address of arr.ravel()[index] (C-contiguous arrays only)."""
    return builder.gep(context.make_array(arrty)(context, builder, arr).data, [index])


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _splat(value, ty=_V16I):
    return ir.Constant(ty, [value] * ty.count)


def _popcount(builder, value):
    return _call(builder, f"llvm.ctpop.i{value.type.width}", value.type, [value])


def _int_mask(builder, bits, lanes):
    """The low `lanes` bits of an integer as a <lanes x i1> mask."""
    return builder.bitcast(builder.trunc(bits, ir.IntType(lanes)) if bits.type.width > lanes else bits,
                           ir.VectorType(_I1, lanes))


def _expandload(builder, ptr, mask, bits):
    """llvm.masked.expandload: consecutive values from ptr placed in the lanes where mask is set, 0 elsewhere."""
    lanes = mask.type.count
    elem = _F32 if bits == 32 else ir.IntType(bits)
    vty = ir.VectorType(elem, lanes)
    suffix = f"v{lanes}f32" if bits == 32 else f"v{lanes}i{bits}"
    return _call(builder, f"llvm.masked.expandload.{suffix}", vty, [ptr, mask, ir.Constant(vty, None)])


def _widen(builder, packed, dtype):
    """A 512-bit vector of bf16 words or int8 bytes -> float32 vectors in lane_columns order."""
    lanes = builder.bitcast(packed, _V16I)
    if dtype == types.uint16:  # bf16 is the top half of a float32: even word << 16, odd word & 0xffff0000
        return [builder.bitcast(builder.shl(lanes, _splat(16)), _V16F),
                builder.bitcast(builder.and_(lanes, _splat(-65536)), _V16F)]
    out = []  # int8: byte k sign-extended by a shift up to the top byte, then an arithmetic shift down
    for k in range(4):
        top = builder.shl(lanes, _splat(24 - 8 * k)) if k < 3 else lanes
        out.append(builder.sitofp(builder.ashr(top, _splat(24)), _V16F))
    return out


def _bits_per_value(dtype):
    return {types.float32: 32, types.uint16: 16, types.int8: 8}[dtype]


def _nm_mask(builder, meta):
    """2:4 metadata (16 nibbles i0 | i1 << 2) -> the 64-bit mask of kept columns, in general-purpose registers.
    Per nibble, one-hot(i) for i = a + 2b is (1 + a)(1 + 3b) = 1 + a + 3b + 3ab; no sum carries out of a nibble."""
    ones = ir.Constant(_I64, 0x1111111111111111)

    def field(shift):
        return builder.and_(builder.lshr(meta, ir.Constant(_I64, shift)) if shift else meta, ones)

    def one_hot(a, b):
        ab = builder.and_(a, b)
        three_b = builder.add(builder.shl(b, ir.Constant(_I64, 1)), b)
        three_ab = builder.add(builder.shl(ab, ir.Constant(_I64, 1)), ab)
        return builder.add(builder.add(ones, a), builder.add(three_b, three_ab))

    return builder.or_(one_hot(field(0), field(1)), one_hot(field(2), field(3)))


# --- intrinsics --------------------------------------------------------------------------------------------------

def _decode_raw(context, builder, sig, args, kind, bits):
    """The 64 columns of one row as 512-bit vectors of stored values (zeros where pruned), and the next start.
    See decode_chunk for the arguments."""
    vals, p, aux_arr, bits_arr, q = args
    lanes = 512 // bits  # one expand or load fills a 512-bit register
    base = _data_ptr(context, builder, sig.args[0], vals, p)
    out = []
    if kind == types.boolean:  # dense: plain loads
        vty = ir.VectorType(_F32 if bits == 32 else ir.IntType(bits), lanes)
        for h in range(CHUNK // lanes):
            ptr = builder.bitcast(builder.gep(base, [ir.Constant(_I64, lanes * h)]), vty.as_pointer())
            out.append(builder.load(ptr, align=bits // 8))
        return out, builder.add(p, ir.Constant(_I64, CHUNK))
    if kind == types.uint64:  # bitmask: each expand starts after the popcount of the mask bits below it
        m64 = builder.load(_data_ptr(context, builder, sig.args[2], aux_arr, q), align=8)
        kptr = builder.bitcast(_data_ptr(context, builder, sig.args[3], bits_arr, q), _I8.as_pointer())
        for h in range(CHUNK // lanes):
            mty = ir.VectorType(_I1, lanes)
            mask = builder.load(builder.bitcast(builder.gep(kptr, [ir.Constant(_I64, lanes * h // 8)]),
                                                mty.as_pointer()), align=1)
            below = _popcount(builder, builder.shl(m64, ir.Constant(_I64, CHUNK - lanes * h))) if h else None
            out.append(_expandload(builder, builder.gep(base, [below]) if h else base, mask, bits))
        return out, builder.add(p, _popcount(builder, m64))
    # 2:4: two values per group of four columns, so an expand of `lanes` columns takes lanes/2 values
    mptr = builder.bitcast(_data_ptr(context, builder, sig.args[2], aux_arr, builder.mul(q, ir.Constant(_I64, 2))),
                           _I64.as_pointer())
    mask64 = _nm_mask(builder, builder.load(mptr, align=4))
    for h in range(CHUNK // lanes):
        mask = _int_mask(builder, builder.lshr(mask64, ir.Constant(_I64, lanes * h)), lanes)
        out.append(_expandload(builder, builder.gep(base, [ir.Constant(_I64, lanes // 2 * h)]), mask, bits))
    return out, builder.add(p, ir.Constant(_I64, CHUNK // 2))


def _decode_types(values, aux):
    """(value bits, format kind) when decode_chunk accepts these arrays, else None."""
    if values.dtype not in (types.float32, types.uint16, types.int8) or \
            aux.dtype not in (types.uint64, types.uint32, types.boolean):
        return None
    return _bits_per_value(values.dtype), aux.dtype


@intrinsic
def decode_chunk(typingctx, values, start, aux, aux_bits, word):
    """(values, start, aux, aux_bits, word) -> ((four f32x16), next start): 64 columns of one row, widened to
    float32 in lane_columns order.

    The format follows aux's dtype: uint64 is a bitmask (word `word` of aux, values packed from `start`);
    uint32 is 2:4 metadata (64-bit word `word`, 32 values from `start`); bool (empty) is dense (64 values from
    `start`). aux_bits must be the same array as aux, passed separately so that LLVM cannot merge the two
    reads: the mask bits then go from memory straight into mask registers, and the popcounts from the copy
    in general-purpose registers."""
    if _decode_types(values, aux) is None:
        return None
    bits, kind = _decode_types(values, aux)

    def codegen(context, builder, sig, args):
        out, nxt = _decode_raw(context, builder, sig, args, kind, bits)
        vectors = out if bits == 32 else [v for packed in out for v in _widen(builder, packed, values.dtype)]
        return context.make_tuple(builder, sig.return_type, [context.make_tuple(builder, _chunk, vectors), nxt])

    return types.Tuple((_chunk, types.int64))(values, start, aux, aux_bits, word), codegen


@intrinsic
def decode_chunk_bytes(typingctx, values, start, aux, aux_bits, word):
    """Like decode_chunk for int8 values, without widening: (i32x16 holding the 64 int8 weights of the chunk in
    column order, 4 per lane, next start)."""
    if values.dtype != types.int8 or _decode_types(values, aux) is None:
        return None
    kind = aux.dtype

    def codegen(context, builder, sig, args):
        out, nxt = _decode_raw(context, builder, sig, args, kind, 8)
        return context.make_tuple(builder, sig.return_type, [builder.bitcast(out[0], _V16I), nxt])

    return types.Tuple((i32x16, types.int64))(values, start, aux, aux_bits, word), codegen


def has_vnni() -> bool:
    """Whether numba compiles for this CPU and it has AVX512-VNNI (vpdpbusd)."""
    import llvmlite.binding as llvm
    from numba.core import config

    return config.CPU_NAME is None and bool(llvm.get_host_cpu_features().get("avx512vnni", False))


@intrinsic
def vdot_u8i8(typingctx, acc, xq, index, weights):
    """acc + Σ_k xq[index + 4l + k] · w[4l + k] per lane l: uint8 x by int8 weights, summed exactly in int32.
    One vpdpbusd with AVX512-VNNI; elsewhere LLVM lowers the generic widening multiply and adds."""
    if xq.dtype != types.uint8:
        return None
    vnni = has_vnni()

    def codegen(context, builder, sig, args):
        a, xs, i, w = args
        ptr = builder.bitcast(_data_ptr(context, builder, sig.args[1], xs, i), _V16I.as_pointer())
        xv = builder.load(ptr, align=1)
        if vnni:
            return _call(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I, [a, xv, w])
        v64 = ir.VectorType(_I32, 64)
        b64 = ir.VectorType(_I8, 64)
        prod = builder.mul(builder.zext(builder.bitcast(xv, b64), v64), builder.sext(builder.bitcast(w, b64), v64))
        for k in range(4):  # lane l adds bytes 4l + k
            a = builder.add(a, builder.shuffle_vector(prod, prod, ir.Constant(_V16I, list(range(k, 64, 4)))))
        return a

    return i32x16(acc, xq, index, weights), codegen


@intrinsic
def visum(typingctx, a):
    """The sum of the 16 int32 lanes, as int64."""
    def codegen(context, builder, sig, args):
        wide = builder.sext(args[0], ir.VectorType(_I64, LANES))
        return _call(builder, "llvm.vector.reduce.add.v16i64", _I64, [wide])

    return types.int64(a), codegen


@intrinsic
def vizero(typingctx):
    return i32x16(), lambda context, builder, sig, args: ir.Constant(_V16I, None)


@intrinsic
def vload_widen(typingctx, values, index):
    """values.ravel()[index : index + 16] (float32, bf16 as uint16, or int8) as a float32 vector."""
    dtype = values.dtype
    if dtype not in (types.float32, types.uint16, types.int8):
        return None
    bits = _bits_per_value(dtype)

    def codegen(context, builder, sig, args):
        ptr = _data_ptr(context, builder, sig.args[0], args[0], args[1])
        vty = _V16F if bits == 32 else ir.VectorType(ir.IntType(bits), LANES)
        v = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=bits // 8)
        if bits == 16:
            return builder.bitcast(builder.shl(builder.zext(v, _V16I), _splat(16)), _V16F)
        return builder.sitofp(v, _V16F) if bits == 8 else v

    return f32x16(values, index), codegen


@intrinsic
def vgather(typingctx, x, base, indices, index, count):
    """Lane l < count: x.ravel()[base + indices.ravel()[index + l]]; lanes from count on are 0 and read nothing."""
    if x.dtype != types.float32 or indices.dtype != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        xs, b, idx, i, n = args
        iptr = builder.bitcast(_data_ptr(context, builder, sig.args[2], idx, i),
                               ir.VectorType(_I16, LANES).as_pointer())
        cols = builder.zext(builder.load(iptr, align=2), ir.VectorType(_I64, LANES))
        start = builder.ptrtoint(_data_ptr(context, builder, sig.args[0], xs, b), _I64)
        first = builder.insert_element(ir.Constant(ir.VectorType(_I64, LANES), ir.Undefined), start,
                                       ir.Constant(_I32, 0))
        addrs = builder.add(builder.shuffle_vector(first, first, ir.Constant(_V16I, None)),
                            builder.mul(cols, _splat(4, ir.VectorType(_I64, LANES))))
        ptrs = builder.inttoptr(addrs, ir.VectorType(_F32.as_pointer(), LANES))
        lane = ir.Constant(ir.VectorType(_I64, LANES), list(range(LANES)))
        limit = builder.insert_element(ir.Constant(ir.VectorType(_I64, LANES), ir.Undefined), n, ir.Constant(_I32, 0))
        mask = builder.icmp_signed("<", lane, builder.shuffle_vector(limit, limit, ir.Constant(_V16I, None)))
        return _call(builder, "llvm.masked.gather.v16f32.v16p0", _V16F,
                     [ptrs, ir.Constant(_I32, 4), mask, ir.Constant(_V16F, None)])

    return f32x16(x, base, indices, index, count), codegen


@intrinsic
def vload(typingctx, array, index):
    """array.ravel()[index : index + 16] of a float32 array."""
    if array.dtype != types.float32:
        return None

    def codegen(context, builder, sig, args):
        ptr = _data_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(ptr, _V16F.as_pointer()), align=4)

    return f32x16(array, index), codegen


@intrinsic
def vzero(typingctx):
    return f32x16(), lambda context, builder, sig, args: ir.Constant(_V16F, None)


@intrinsic
def vfma(typingctx, a, b, c):
    """a·b + c, fused where the CPU has FMA (llvm.fmuladd)."""
    return f32x16(a, b, c), lambda context, builder, sig, args: _call(builder, "llvm.fmuladd.v16f32", _V16F, list(args))


@intrinsic
def vadd(typingctx, a, b):
    return f32x16(a, b), lambda context, builder, sig, args: builder.fadd(args[0], args[1])


@intrinsic
def vsum(typingctx, a):
    """The sum of the 16 lanes, as a tree of halves."""
    def codegen(context, builder, sig, args):
        v, n = args[0], LANES
        while n > 1:
            n //= 2
            halves = [ir.Constant(ir.VectorType(_I32, n), list(range(o, o + n))) for o in (0, n)]
            v = builder.fadd(*(builder.shuffle_vector(v, v, h) for h in halves))
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return types.float32(a), codegen


@intrinsic
def prefetch(typingctx, array, index):
    """Ask for the cache line holding array.ravel()[index]; never faults, even past the end of the array."""
    def codegen(context, builder, sig, args):
        ptr = builder.bitcast(_data_ptr(context, builder, sig.args[0], args[0], args[1]), _I8.as_pointer())
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                                                          ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.none(array, index), codegen
