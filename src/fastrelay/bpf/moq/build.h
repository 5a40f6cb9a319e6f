/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Egress stage 1 and 2: decide, per frame of the original, what the subscriber gets, and write
 * it into scratch.out as that connection's frame: its own stream id (opened from the shared
 * counter at the subgroup's first packet, or the subgroup skipped whole), its offsets (shifted
 * when its alias encodes to another length), within the peer's stream and connection credit
 * and the congestion budget. A stream the kernel cannot continue is handed to userspace at
 * the exact byte, with a record saying why.
 */
#ifndef FR_MOQ_BUILD_H
#define FR_MOQ_BUILD_H

#include "moq/varint.h"
#include "moq/rewrite.h"
#include "moq/recovery.h"

static __always_inline void copy_in(struct scratch *s, __u32 from, __u32 n)
{
	n = BOUNDED(n, MASK);
	bpf_probe_read_kernel(&s->out[BOUNDED(s->bs.pos, MASK)], n, &s->in[BOUNDED(from, MASK)]);
	s->bs.pos += n;
}

/* Hand frame i's stream to userspace from this frame on (the one place that does it). */
GLOBAL int fr_moq_handover(struct fr_moq_dstream *ds, __u32 i, __u32 reason)
{
	struct scratch *s = scratch();
	struct fr_moq_handover rec = { .kind = FR_MOQ_REC_HANDOVER };
	struct fr_moq_conn *conn;
	struct pframe *f;
	__u32 slot;

	if (!s || !ds || i >= FR_MOQ_MAX_FRAMES)
		return -1;
	slot = s->bs.slot;
	conn = bpf_map_lookup_elem(&fr_moq_conns, &slot);
	if (!conn)
		return -1;
	f = &s->frames[BOUNDED(i, FR_MOQ_MAX_FRAMES - 1)];
	rec.state = reason == FR_MOQ_HO_CONGESTION ? FR_MOQ_DS_ABANDONED : FR_MOQ_DS_USER;
	ds->state = rec.state;
	ds->handover = f->offset;
	count(reason == FR_MOQ_HO_CONGESTION ? FR_MQ_ABANDONED :
	      reason == FR_MOQ_HO_FLOW ? FR_MQ_HANDOVER_FLOW : FR_MQ_HANDOVER_SIZE);
	rec.reason = reason;
	rec.priority = f->priority;
	rec.slot = slot;
	rec.gen = conn->gen;
	rec.track = f->track;
	rec.up = s->up;
	rec.stream = ds->stream;
	rec.offset = f->offset ? f->offset + ds->delta : 0;
	rec.up_stream = f->stream;
	rec.up_offset = f->offset;
	rec.group = f->group;
	rec.time_ns = bpf_ktime_get_ns();
	if (bpf_ringbuf_output(&fr_moq_events, &rec, sizeof(rec), rb_lazy()))
		count(FR_MQ_RINGBUF_FULL);   /* userspace finds the state in fr_moq_dstream */
	return 0;
}

/* A new subgroup for this subscriber: open a stream for it, or skip it whole. */
static __always_inline struct fr_moq_dstream *open_stream(struct scratch *s, struct pframe *f, struct fr_moq_conn *conn,
							   struct fr_moq_state *st, struct fr_moq_stream_key *key)
{
	struct fr_moq_dstream ds = { .limit = conn->stream_window, .priority = f->priority };
	__u64 sid;

	if (f->offset != 0 || !f->fresh) {     /* joined after the stream began: userspace's */
		ds.state = FR_MOQ_DS_NOT_JOINED;
		count(FR_MQ_NOT_JOINED);
	} else if (f->priority > conn->protect_priority &&
		   (s->bs.budget < conn->skip_below || st->next_stream + 4 * FR_MOQ_STREAM_RESERVE >= conn->max_stream)) {
		/* congested, or short of stream credit: the last streams are kept for protected subgroups */
		ds.state = FR_MOQ_DS_SKIPPED;
		count(FR_MQ_SKIP_CONGESTION);
	} else {
		sid = st->next_stream;
		if (sid >= conn->max_stream) {
			ds.state = FR_MOQ_DS_SKIPPED;
			count(FR_MQ_SKIP_STREAM_LIMIT);
		} else if (__sync_val_compare_and_swap(&st->next_stream, sid, sid + 4) != sid) {
			ds.state = FR_MOQ_DS_USER;   /* raced with userspace: it opens the stream */
		} else {
			ds.state = FR_MOQ_DS_FORWARD;
			ds.stream = sid;
			ds.delta = (__s32)s->bs.alias_len - (__s32)f->alias_len;
		}
	}
	if (bpf_map_update_elem(&fr_moq_dstream, key, &ds, BPF_NOEXIST))
		return NULL;
	return bpf_map_lookup_elem(&fr_moq_dstream, key);
}

/* Frame i of the original, for the subscriber in scratch.bs: written to scratch.out and
 * recorded in scratch.sent, skipped, or its stream handed over. 0 to go on, 1 past the last. */
GLOBAL int fr_moq_build_frame(__u32 i)
{
	struct scratch *s = scratch();
	struct fr_moq_stream_key key = {};
	struct fr_moq_dstream *ds = NULL;
	struct fr_moq_sent_frame *rec;
	struct fr_moq_conn *conn;
	struct fr_moq_state *st;
	struct pframe *f;
	__u64 sid = 0, down_off = 0, dlen;
	__u32 slot, hdr, rest, reason = 0, dgram;
	__u8 type;

	if (!s || i >= s->nframes || i >= FR_MOQ_MAX_FRAMES)
		return 1;
	f = &s->frames[BOUNDED(i, FR_MOQ_MAX_FRAMES - 1)];
	if (f->kind == FK_NONE || f->track != s->track)
		return 0;
	slot = s->bs.slot;
	conn = bpf_map_lookup_elem(&fr_moq_conns, &slot);
	st = bpf_map_lookup_elem(&fr_moq_state, &slot);
	if (!conn || !st)
		return 1;
	dgram = f->kind == FK_DATAGRAM;

	if (!dgram) {
		key.conn = slot;
		key.up = s->up;
		key.stream = f->stream;
		ds = bpf_map_lookup_elem(&fr_moq_dstream, &key);
		if (!ds)
			ds = open_stream(s, f, conn, st, &key);
		if (!ds || ds->state != FR_MOQ_DS_FORWARD)
			return 0;
		sid = ds->stream;
		down_off = f->offset ? f->offset + ds->delta : 0;
		dlen = f->offset || !f->alias_len ? f->len : f->len + ds->delta;
		type = 0x08 | 0x02 | (down_off ? 0x04 : 0) | (f->fin ? 0x01 : 0);
		hdr = 1 + varint_len(sid) + (down_off ? varint_len(down_off) : 0) + 2;
		/* congested: a started low-priority subgroup goes no further (userspace resets it);
		 * protected ones (keyframes: small, and what the rest depends on) keep going */
		if (s->bs.budget < conn->skip_below && f->priority > conn->protect_priority)
			reason = FR_MOQ_HO_CONGESTION;
		else if (down_off + dlen > ds->limit || st->credit < (__s64)dlen)
			reason = FR_MOQ_HO_FLOW;
		else if (s->bs.full) {
			reason = FR_MOQ_HO_FLOW;      /* no room to track its packet: userspace continues */
			count(FR_MQ_LR_FULL);
		}
	} else {
		dlen = f->len - f->alias_len + s->bs.alias_len;
		type = 0x31;
		hdr = 1 + 2;
	}
	if (!reason && (s->bs.pos + hdr + dlen + FR_MOQ_TAG_LEN > s->bs.limit || s->bs.nout >= FR_MOQ_MAX_FRAMES)) {
		if (dgram)
			return 0;        /* a datagram that does not fit is dropped, as QUIC may */
		reason = FR_MOQ_HO_SIZE;
	}
	if (reason) {
		fr_moq_handover(ds, i, reason);
		return 0;
	}

	/* frame header: the length always in 2 bytes (a frame is < 16384 bytes; QUIC allows a
	 * longer encoding than needed for every field but the frame type) */
	s->out[BOUNDED(s->bs.pos, MASK)] = type;
	s->bs.pos++;
	if (!dgram) {
		varint_put(s->out, s->bs.pos, sid, varint_len(sid));
		s->bs.pos += varint_len(sid);
		if (down_off) {
			varint_put(s->out, s->bs.pos, down_off, varint_len(down_off));
			s->bs.pos += varint_len(down_off);
		}
	}
	varint_put(s->out, s->bs.pos, dlen, 2);
	s->bs.pos += 2;
	if (f->alias_len && (f->offset == 0 || dgram)) {
		/* type varint as it was, the subscriber's alias, the rest as it was */
		copy_in(s, f->data_off, f->alias_off - f->data_off);
		varint_put(s->out, s->bs.pos, s->bs.alias, s->bs.alias_len);
		s->bs.pos += s->bs.alias_len;
		rest = f->data_off + f->len - f->alias_off - f->alias_len;
		copy_in(s, f->alias_off + f->alias_len, rest);
	} else {
		copy_in(s, f->data_off, f->len);
	}
	if (!dgram)
		__sync_fetch_and_add(&st->credit, -(__s64)dlen);

	rec = &s->sent.frames[BOUNDED(s->bs.nout, FR_MOQ_MAX_FRAMES - 1)];
	rec->stream = sid;
	rec->offset = down_off;
	rec->up_stream = f->stream;
	rec->up_offset = f->offset;
	rec->len = dlen;
	rec->fin = f->fin;
	rec->datagram = dgram;
	s->bs.nout++;
	if (!dgram && !down_off)
		s->bs.notable = 1;
	if (ds && down_off + dlen > ds->sent_end)
		ds->sent_end = down_off + dlen;
	if (ds && f->fin)
		ds->fin = 1;
	return 0;
}

/* Report the SENT record (nframes 0: the number was spent on a dropped packet). */
static __always_inline void emit_sent(struct scratch *s)
{
	__u32 n = s->sent.nframes > FR_MOQ_MAX_FRAMES ? FR_MOQ_MAX_FRAMES : s->sent.nframes;
	__u64 size = offsetof(struct fr_moq_sent, frames) + n * sizeof(struct fr_moq_sent_frame);

	if (bpf_ringbuf_output(&fr_moq_events, &s->sent, size, rb_lazy()))
		count(FR_MQ_RINGBUF_FULL);
}

/* Turn the clone of an upstream packet into a packet of connection `slot`; a TC verdict. */
GLOBAL int fr_moq_build_clone(struct __sk_buff *skb, __u32 slot)
{
	struct scratch *s = scratch();
	struct fr_moq_dsub_key dkey = {};
	struct fr_moq_sent_table *tb = NULL;
	struct fr_moq_recovery *rec = NULL;
	struct fr_moq_dsub *dsub;
	struct fr_moq_conn *conn;
	struct fr_moq_state *st;
	struct fr_udp_pkt p = {};
	__u32 len, i;
	__u64 pn, now;

	if (!skb || !s)
		return TC_ACT_SHOT;
	dkey.conn = slot;
	dkey.track = s->track;
	conn = bpf_map_lookup_elem(&fr_moq_conns, &slot);
	st = bpf_map_lookup_elem(&fr_moq_state, &slot);
	dsub = bpf_map_lookup_elem(&fr_moq_dsub, &dkey);
	if (!conn || !st || !conn->gen || !dsub) {
		count(FR_MQ_DROP_EMPTY);
		return TC_ACT_SHOT;
	}
	if (fr_parse_udp(skb, &p) != FR_PARSE_OK || p.family != conn->family) {
		count(FR_MQ_ERR);
		return TC_ACT_SHOT;
	}
	if (bpf_ringbuf_query(&fr_moq_events, BPF_RB_AVAIL_DATA) > FR_MOQ_RING_SIZE - RB_SEND_HEADROOM) {
		count(FR_MQ_RINGBUF_FULL);   /* not sent: without its record it could not be registered */
		return TC_ACT_SHOT;
	}
	s->bs.budget = st->budget;
	s->bs.full = 0;
	s->bs.notable = 0;
	if (conn->recovery) {
		/* the window the kernel's own congestion control leaves (userspace may lower it) */
		rec = bpf_map_lookup_elem(&fr_moq_rec, &slot);
		tb = bpf_map_lookup_elem(&fr_moq_rec_sent, &slot);
		if (!rec || !tb || rec->gen != conn->gen) {
			count(FR_MQ_ERR);
			return TC_ACT_SHOT;
		}
		s->bs.budget = (__s64)rec->cwnd - (__s64)rec->bytes_in_flight + st->budget;
		s->bs.full = st->next_pn - rec->base >= FR_MOQ_SENT_SLOTS - 2 * FR_MOQ_MAX_SUBS;
	}
	s->bs.slot = slot;
	s->bs.alias = dsub->alias;
	s->bs.alias_len = varint_len(dsub->alias);
	s->bs.limit = conn->max_payload < FR_MOQ_MAX_PAYLOAD ? conn->max_payload : FR_MOQ_MAX_PAYLOAD;
	s->bs.pos = SHORT_HDR_LEN;
	s->bs.nout = 0;
	for (i = 0; i < FR_MOQ_MAX_FRAMES; i++)
		if (fr_moq_build_frame(i))
			break;
	if (!s->bs.nout) {
		count(FR_MQ_DROP_EMPTY);
		return TC_ACT_SHOT;
	}

	/* short header, identity tag, zero padding for the checksum */
	len = s->bs.pos + FR_MOQ_TAG_LEN;
	if (len > FR_MOQ_MAX_PAYLOAD || len < SHORT_HDR_LEN) {
		count(FR_MQ_ERR);
		return TC_ACT_SHOT;
	}
	__builtin_memset(&s->out[BOUNDED(s->bs.pos, MASK)], 0, 8);
	__builtin_memset(&s->out[BOUNDED(s->bs.pos + 8, MASK)], 0, 8);
	__builtin_memset(&s->out[BOUNDED(s->bs.pos + 16, MASK)], 0, 8);
	pn = __sync_fetch_and_add(&st->next_pn, 1);
	s->out[0] = 0x41;
	__builtin_memcpy(&s->out[1], conn->dcid, FR_MOQ_CID_LEN);
	s->out[1 + FR_MOQ_CID_LEN] = pn >> 8;
	s->out[2 + FR_MOQ_CID_LEN] = pn;

	s->sent.kind = FR_MOQ_REC_SENT;
	s->sent.slot = slot;
	s->sent.gen = conn->gen;
	s->sent.pn = pn;
	s->sent.bytes = len;
	s->sent.track = s->track;
	s->sent.up = s->up;
	if (fr_moq_rewrite(skb, &p, slot, len)) {
		s->sent.nframes = 0;
		s->sent.time_ns = bpf_ktime_get_ns();
		emit_sent(s);
		count(FR_MQ_ERR);
		return TC_ACT_SHOT;
	}
	now = bpf_ktime_get_ns();
	s->sent.nframes = s->bs.nout;
	s->sent.time_ns = now;
	if (rec && tb) {
		lr_register(s, rec, tb, slot, pn, len, now);
		if (s->bs.nout > FR_MOQ_PKT_FRAMES || s->bs.notable)
			emit_sent(s);             /* a stream starts, or frames the entry cannot hold */
	} else {
		__sync_fetch_and_add(&st->budget, -(__s64)len);
		emit_sent(s);
	}
	__sync_fetch_and_add(&st->packets, 1);
	__sync_fetch_and_add(&st->bytes, len);
	count(FR_MQ_SENT);
	count_n(FR_MQ_SENT_BYTES, len);
	return TC_ACT_OK;
}

#endif /* FR_MOQ_BUILD_H */
