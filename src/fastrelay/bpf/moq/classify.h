/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Ingress stage 2: tie each parsed frame to a track. A stream is learnt at its offset 0 from
 * its SUBGROUP_HEADER; a stream first seen elsewhere (its start was missed or reordered)
 * stays userspace's, and one that ended stays known as such (a late copy of its start must
 * not open it again). Only the packet that creates a stream's entry is its start for
 * subscribers: a start the publisher re-sent comes after packets that subscribers who joined
 * since have missed.
 */
#ifndef FR_MOQ_CLASSIFY_H
#define FR_MOQ_CLASSIFY_H

#include "moq/varint.h"

/* An OBJECT_DATAGRAM of a known alias (types 0x00..0x2f). */
static __always_inline void classify_datagram(struct scratch *s, struct pframe *f)
{
	struct fr_moq_alias_key akey = { .up = s->up };
	struct fr_moq_alias_val *av;
	__u32 off = f->data_off, end = f->data_off + f->len;
	__u64 type, alias;
	int n, an;

	f->kind = FK_NONE;
	n = varint_get(s->in, off, end, &type);
	if (n < 0 || type > 0x2f)
		return;
	an = varint_get(s->in, off + n, end, &alias);
	if (an < 0)
		return;
	akey.alias = alias;
	av = bpf_map_lookup_elem(&fr_moq_alias, &akey);
	if (!av)
		return;
	f->kind = FK_DATAGRAM;
	f->track = av->track;
	f->alias_off = off + n;
	f->alias_len = an;
	f->priority = av->default_priority;
}

/* A stream the kernel knows: its track, and at a re-sent start where the alias sits. */
static __always_inline void classify_known(struct scratch *s, struct pframe *f, struct fr_moq_ustream *known)
{
	__u32 off = f->data_off, end = f->data_off + f->len;
	__u64 type, alias;
	int n, an;

	if (known->kind != FR_MOQ_US_SUBGROUP) {
		f->kind = FK_NONE;
		return;
	}
	f->track = known->track;
	f->priority = known->priority;
	f->group = known->group;
	if (f->offset != 0)
		return;
	n = varint_get(s->in, off, end, &type);
	an = n < 0 ? -1 : varint_get(s->in, off + n, end, &alias);
	if (an < 0) {
		f->kind = FK_NONE;
		return;
	}
	f->alias_off = off + n;
	f->alias_len = an;
}

/* A stream's first sight: a SUBGROUP_HEADER at offset 0 names its track. */
static __always_inline void classify_new(struct scratch *s, struct pframe *f, struct fr_moq_ustream *us)
{
	struct fr_moq_alias_key akey = { .up = s->up };
	struct fr_moq_alias_val *av;
	__u32 off = f->data_off, end = f->data_off + f->len;
	__u64 type, alias, group = 0, v;
	int n, an;

	f->kind = FK_NONE;
	if (f->offset != 0)
		return;
	n = varint_get(s->in, off, end, &type);
	/* SUBGROUP_HEADER: 0b00X1XXXX, SUBGROUP_ID_MODE 0b11 reserved */
	if (n < 0 || (type & 0xd0) != 0x10 || ((type >> 1) & 3) == 3)
		return;
	an = varint_get(s->in, off + n, end, &alias);
	if (an < 0)
		return;
	f->alias_off = off + n;
	f->alias_len = an;
	off += n + an;
	n = varint_get(s->in, off, end, &group);
	if (n < 0)
		return;
	off += n;
	if (((type >> 1) & 3) == 2) {    /* explicit Subgroup ID */
		n = varint_get(s->in, off, end, &v);
		if (n < 0)
			return;
		off += n;
	}
	akey.alias = alias;
	av = bpf_map_lookup_elem(&fr_moq_alias, &akey);
	if (!av)
		return;
	if (type & 0x20) {
		us->priority = av->default_priority;
	} else {
		if (off >= end)
			return;
		us->priority = s->in[BOUNDED(off, MASK)];
	}
	us->kind = FR_MOQ_US_SUBGROUP;
	us->track = av->track;
	us->group = group;
	f->kind = FK_STREAM;
	f->track = us->track;
	f->priority = us->priority;
	f->group = group;
}

/* Classify frame i and add its track to scratch.tracks; 0 to go on, 1 past the last frame. */
GLOBAL int fr_moq_classify(__u32 i)
{
	struct scratch *s = scratch();
	struct fr_moq_stream_key key = {};
	struct fr_moq_ustream us = { .kind = FR_MOQ_US_OTHER }, *known;
	struct pframe *f;
	__u32 j;

	if (!s || i >= s->nframes || i >= FR_MOQ_MAX_FRAMES)
		return 1;
	f = &s->frames[BOUNDED(i, FR_MOQ_MAX_FRAMES - 1)];
	if (f->kind == FK_DATAGRAM) {
		classify_datagram(s, f);
	} else {
		key.conn = s->up;
		key.stream = f->stream;
		known = bpf_map_lookup_elem(&fr_moq_ustream, &key);
		if (known) {
			classify_known(s, f, known);
		} else {
			classify_new(s, f, &us);
			if (us.kind != FR_MOQ_US_SUBGROUP)
				count(FR_MQ_STREAM_OTHER);
			if (bpf_map_update_elem(&fr_moq_ustream, &key, &us, BPF_NOEXIST) == 0)
				f->fresh = us.kind == FR_MOQ_US_SUBGROUP;
		}
	}
	if (f->kind == FK_NONE)
		return 0;
	for (j = 0; j < FR_MOQ_MAX_TRACKS; j++) {
		if (j >= s->ntracks)
			break;
		if (s->tracks[j] == f->track)
			return 0;
	}
	if (s->ntracks < FR_MOQ_MAX_TRACKS)
		s->tracks[BOUNDED(s->ntracks, FR_MOQ_MAX_TRACKS - 1)] = f->track;
	s->ntracks++;
	return 0;
}

/* Classify every frame; how many distinct tracks the packet carries. */
static __always_inline __u32 classify_frames(struct scratch *s)
{
	__u32 i;

	s->ntracks = 0;
	for (i = 0; i < FR_MOQ_MAX_FRAMES; i++)
		if (fr_moq_classify(i))
			break;
	return s->ntracks;
}

#endif /* FR_MOQ_CLASSIFY_H */
