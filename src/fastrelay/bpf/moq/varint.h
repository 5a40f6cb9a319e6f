/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * QUIC variable-length integers (RFC 9000 §16) without data-dependent branches: one 8-byte
 * load or store and shifts. A branch per encoded length (1, 2, 4, 8) would split the
 * verifier's states four ways at every varint, and a frame has up to four of them.
 */
#ifndef FR_MOQ_VARINT_H
#define FR_MOQ_VARINT_H

#include "moq/maps.h"

/* Read the varint at buf[off] (all of it before `end`); its length, or -1. `buf` is a scratch
 * buffer with at least 8 bytes of slack past FR_MOQ_BUF. */
static __always_inline int varint_get(const __u8 *buf, __u32 off, __u32 end, __u64 *val)
{
	__u64 w;
	__u32 len;

	if (off >= end || off >= FR_MOQ_BUF)
		return -1;
	w = __builtin_bswap64(*(const __u64 *)&buf[BOUNDED(off, MASK)]);
	len = 1U << (w >> 62);
	if (off + len > end)
		return -1;
	*val = (w & 0x3fffffffffffffffULL) >> (64 - 8 * len);
	return len;
}

/* The shortest encoding's length: 1, 2, 4 or 8 (v < 2^62). Each (limit - v) >> 63 is 1 exactly
 * when v > limit; OPAQUE keeps clang from turning that back into a compare and branch. */
static __always_inline __u32 varint_len(__u64 v)
{
	__u32 n = ((OPAQUE(63) - v) >> 63) + ((OPAQUE(16383) - v) >> 63) + ((OPAQUE((1ULL << 30) - 1) - v) >> 63);

	return 1U << n;
}

/* Write v as a varint of `len` (1, 2, 4 or 8) bytes at out[pos]. The store is 8 bytes wide:
 * the bytes past the varint are scratch that the next write replaces. */
static __always_inline void varint_put(__u8 *out, __u32 pos, __u64 v, __u32 len)
{
	__u64 prefix = (len >> 1) - (len >> 3);   /* 1 -> 0, 2 -> 1, 4 -> 2, 8 -> 3 */
	__u32 bits = 8 * (len & 15);

	v = (v | (prefix << (bits - 2))) << (64 - bits);
	*(__u64 *)&out[BOUNDED(pos, MASK)] = __builtin_bswap64(v);
}

#endif /* FR_MOQ_VARINT_H */
