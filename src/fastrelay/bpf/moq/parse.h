/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Ingress stage 1: split a publisher's 1-RTT payload (in scratch.in) into frames. Every frame
 * type of RFC 9000 and DATAGRAM (RFC 9221) is walked by its encoding; STREAM and DATAGRAM
 * frames are recorded in scratch.frames for the next stages. Anything unknown or inconsistent
 * sets ps.err: the packet then only goes up to userspace.
 */
#ifndef FR_MOQ_PARSE_H
#define FR_MOQ_PARSE_H

#include "moq/varint.h"

static __always_inline int add_frame(struct scratch *s, __u8 kind, __u64 stream, __u64 offset, __u64 len, __u8 fin)
{
	struct parse_state *c = &s->ps;
	struct pframe *f;

	if (len > c->end - c->off || s->nframes >= FR_MOQ_MAX_FRAMES)
		return -1;
	f = &s->frames[BOUNDED(s->nframes, FR_MOQ_MAX_FRAMES - 1)];
	f->stream = stream;
	f->offset = offset;
	f->data_off = c->off;
	f->len = len;
	f->fin = fin;
	f->kind = kind;          /* refined by classify */
	f->alias_len = 0;
	f->fresh = 0;
	s->nframes++;
	c->off += len;
	return 0;
}

/* One more varint of the frame being skipped. */
static __always_inline int skip_varint(struct scratch *s)
{
	struct parse_state *c = &s->ps;
	__u64 v;
	int n;

	n = varint_get(s->in, c->off, c->end, &v);
	if (n < 0)
		return -1;
	c->off += n;
	c->skip_v--;
	c->vidx++;
	if (c->ack && c->vidx == 3) {            /* ACK Range Count */
		if (v > 256)
			return -1;
		c->skip_v += 2 * v + (c->ecn ? 3 : 0);
	}
	if (!c->skip_v) {
		if (c->len_last)
			c->off += v > FR_MOQ_BUF ? FR_MOQ_BUF : v;
		c->off += c->fixed;
		if (c->off > c->end)
			return -1;
	}
	return 0;
}

/* The fields of a STREAM frame (type 0x08..0x0f) after its type. */
static __always_inline int stream_frame(struct scratch *s, __u64 type)
{
	struct parse_state *c = &s->ps;
	__u64 id, offset = 0, len;
	int n;

	n = varint_get(s->in, c->off, c->end, &id);
	if (n < 0)
		return -1;
	c->off += n;
	if (type & 0x04) {
		n = varint_get(s->in, c->off, c->end, &offset);
		if (n < 0)
			return -1;
		c->off += n;
	}
	if (type & 0x02) {
		n = varint_get(s->in, c->off, c->end, &len);
		if (n < 0)
			return -1;
		c->off += n;
	} else {
		len = c->end - c->off;
	}
	return add_frame(s, FK_STREAM, id, offset, len, type & 0x01);
}

/* A frame type: how many varints follow, and what comes after them. */
static __always_inline int frame_type(struct scratch *s, __u64 v)
{
	struct parse_state *c = &s->ps;
	__u64 len;
	int n;

	c->ack = c->ecn = c->len_last = 0;
	c->fixed = 0;
	c->vidx = 0;
	switch (v) {
	case 0x00:               /* PADDING */
	case 0x01:               /* PING */
	case 0x1e:               /* HANDSHAKE_DONE */
		return 0;
	case 0x02:               /* ACK */
	case 0x03:
		c->ack = 1;
		c->ecn = v == 0x03;
		c->skip_v = 4;
		return 0;
	case 0x04:               /* RESET_STREAM */
		c->skip_v = 3;
		return 0;
	case 0x05:               /* STOP_SENDING */
	case 0x11:               /* MAX_STREAM_DATA */
	case 0x15:               /* STREAM_DATA_BLOCKED */
		c->skip_v = 2;
		return 0;
	case 0x06:               /* CRYPTO */
	case 0x1d:               /* CONNECTION_CLOSE (application) */
		c->skip_v = 2;
		c->len_last = 1;
		return 0;
	case 0x07:               /* NEW_TOKEN */
		c->skip_v = 1;
		c->len_last = 1;
		return 0;
	case 0x10:               /* MAX_DATA */
	case 0x12:               /* MAX_STREAMS */
	case 0x13:
	case 0x14:               /* DATA_BLOCKED */
	case 0x16:               /* STREAMS_BLOCKED */
	case 0x17:
	case 0x19:               /* RETIRE_CONNECTION_ID */
		c->skip_v = 1;
		return 0;
	case 0x18:               /* NEW_CONNECTION_ID: the 1-byte length (<= 20) reads as a varint */
		c->skip_v = 3;
		c->len_last = 1;
		c->fixed = 16;
		return 0;
	case 0x1a:               /* PATH_CHALLENGE */
	case 0x1b:               /* PATH_RESPONSE */
		c->off += 8;
		return c->off > c->end ? -1 : 0;
	case 0x1c:               /* CONNECTION_CLOSE (transport) */
		c->skip_v = 3;
		c->len_last = 1;
		return 0;
	case 0x30:               /* DATAGRAM, to the end of the packet */
		return add_frame(s, FK_DATAGRAM, 0, 0, c->end - c->off, 0);
	case 0x31:               /* DATAGRAM with length */
		n = varint_get(s->in, c->off, c->end, &len);
		if (n < 0)
			return -1;
		c->off += n;
		return add_frame(s, FK_DATAGRAM, 0, 0, len, 0);
	}
	if (v >= 0x08 && v <= 0x0f)
		return stream_frame(s, v);
	return -1;                 /* unknown frame: userspace's */
}

/* One step of the walk: a frame's type, or one varint of a frame being skipped.
 * 0: go on, 1: done (end of packet, or an error in ps.err). */
GLOBAL int fr_moq_parse_step(void)
{
	struct scratch *s = scratch();
	__u64 v;
	int n;

	if (!s)
		return 1;
	if (s->ps.off >= s->ps.end)
		return 1;
	if (s->ps.skip_v)
		n = skip_varint(s);
	else {
		n = varint_get(s->in, s->ps.off, s->ps.end, &v);
		if (n >= 0) {
			s->ps.off += n;
			n = frame_type(s, v);
		}
	}
	if (n < 0) {
		s->ps.err = 1;
		return 1;
	}
	return 0;
}

static long parse_cb(__u32 i, void *ctx)
{
	return CB_RESULT(fr_moq_parse_step());
}

/* Parse scratch.in[SHORT_HDR_LEN, end) into scratch.frames; 0 if every frame was understood. */
static __always_inline int parse_frames(struct scratch *s, __u32 end)
{
	__builtin_memset(&s->ps, 0, sizeof(s->ps));
	s->ps.off = SHORT_HDR_LEN;
	s->ps.end = end;
	s->nframes = 0;
	bpf_loop(FR_MOQ_BUF, parse_cb, NULL, 0);
	return s->ps.err || s->ps.skip_v ? -1 : 0;
}

#endif /* FR_MOQ_PARSE_H */
