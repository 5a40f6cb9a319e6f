/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * RFC 9002 loss recovery and NewReno for one 1-RTT packet number space, in the kernel: what
 * aioquic's QuicPacketRecovery does with congestion_control_algorithm="reno", with the handshake
 * confirmed and the peer's address validated, held to it by tests/datapath/kernel/test_recovery.py.
 *
 * State per recovery slot: fr_moq_rec (RTT, timers, window), fr_moq_rec_sent (a ring of
 * FR_MOQ_SENT_SLOTS sent packets indexed by pn & mask, an entry valid while its gen is the
 * slot's and its state OUTSTANDING) and fr_moq_rec_io (the call being worked on: the syscall
 * program copies its argument there, the stages read and write it, the results are copied
 * back). Every outstanding packet number is in [base, sent_end), at most FR_MOQ_SENT_SLOTS
 * wide, so each walk is one bpf_loop of bounded count over it; its steps are global functions.
 *
 * Integer nanoseconds where aioquic has float seconds: srtt = (7 srtt + latest) / 8, rttvar =
 * (3 rttvar + |min - latest|) / 4, the first rttvar = latest / 2 and the loss delay 9/8 of the
 * RTT round down to the nanosecond (aioquic's floats do not), so a decision lands on the other
 * side only when a time is within a few nanoseconds of its threshold. The PTO backoff shift is
 * capped at 2^16.
 *
 * Concurrency: the egress registers the packets it builds without a lock (each number is its
 * own entry, written before the packet leaves, its state last; the in-flight counters and
 * sent_end change atomically). Everything else on a slot (an ACK, the timer, userspace's
 * calls) holds the slot's `busy` word, taken by compare-and-swap: a bpf_spin_lock cannot be
 * held across the bpf_loop walks. A taker that finds it busy does not wait: an ACK-only
 * packet goes up instead (aioquic hands its ACK down again), userspace tries again.
 *
 * Timer: one bpf_timer per slot (fr_moq_rec_timer), armed at the loss detection time (and
 * cancelled when nothing is outstanding); when it fires and the timeout is due it wakes
 * userspace (a TIMER record), which runs FR_MOQ_LR_EXPIRE: the timeout if it is due, else the
 * timer armed again. A timer the state has moved later is armed again in the kernel.
 */
#ifndef FR_MOQ_RECOVERY_H
#define FR_MOQ_RECOVERY_H

#include "moq/maps.h"

#define LR_MASK (FR_MOQ_SENT_SLOTS - 1)
#define LR_RANGE_MASK (FR_MOQ_MAX_ACK_RANGES - 1)
#define LR_OUT_MASK (FR_MOQ_LR_MAX_RANGES - 1)
#define LR_GRANULARITY 1000000ULL        /* kGranularity, 1 ms */
#define LR_NONE (~0ULL)
#define LR_PACKET_THRESHOLD 3
#define LR_INITIAL_WINDOW 10
#define LR_MINIMUM_WINDOW 2
#define LR_MAX_BACKOFF 16
#define LR_TIMER_SLACK 100000ULL          /* a timer this close to its time counts as due */
#ifndef CLOCK_MONOTONIC
#define CLOCK_MONOTONIC 1                /* bpf_ktime_get_ns's clock */
#endif

_Static_assert((FR_MOQ_SENT_SLOTS & LR_MASK) == 0, "FR_MOQ_SENT_SLOTS must be a power of two");
_Static_assert((FR_MOQ_MAX_ACK_RANGES & LR_RANGE_MASK) == 0, "FR_MOQ_MAX_ACK_RANGES must be a power of two");
_Static_assert(FR_MOQ_RTT_SAMPLES <= 8, "mon_samples holds 8");
_Static_assert((FR_MOQ_LR_MAX_RANGES & LR_OUT_MASK) == 0, "FR_MOQ_LR_MAX_RANGES must be a power of two");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FR_MOQ_MAX_RECOVERY_CONNS);
	__uint(map_flags, BPF_F_MMAPABLE);      /* userspace reads the summary without a syscall */
	__type(key, __u32);
	__type(value, struct fr_moq_recovery);
} fr_moq_rec SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FR_MOQ_MAX_RECOVERY_CONNS);
	__type(key, __u32);
	__type(value, struct fr_moq_sent_table);
} fr_moq_rec_sent SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FR_MOQ_MAX_RECOVERY_CONNS);
	__type(key, __u32);
	__type(value, struct fr_moq_recover_args);
} fr_moq_rec_io SEC(".maps");

/* fr_moq_rec_timer[slot] (kernel only) */
struct lr_timer {
	struct bpf_timer t;
	__u32 gen;                   /* the slot generation it was set up for */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FR_MOQ_MAX_RECOVERY_CONNS);
	__type(key, __u32);
	__type(value, struct lr_timer);
} fr_moq_rec_timer SEC(".maps");

struct lr {
	struct fr_moq_recovery *st;
	struct fr_moq_sent_table *tb;
	struct fr_moq_recover_args *io;
};

/* The slot's three map values; 0 if all are there. */
static __always_inline int lr_get(__u32 slot, struct lr *c)
{
	c->st = bpf_map_lookup_elem(&fr_moq_rec, &slot);
	c->tb = bpf_map_lookup_elem(&fr_moq_rec_sent, &slot);
	c->io = bpf_map_lookup_elem(&fr_moq_rec_io, &slot);
	return !c->st || !c->tb || !c->io;
}

static __always_inline __u64 lr_max(__u64 a, __u64 b) { return a > b ? a : b; }
static __always_inline __u64 lr_min(__u64 a, __u64 b) { return a < b ? a : b; }

static __always_inline int lr_lock(struct fr_moq_recovery *st)
{
	return __sync_val_compare_and_swap(&st->busy, 0, 1) == 0;
}

static __always_inline void lr_unlock(struct fr_moq_recovery *st)
{
	__sync_fetch_and_and(&st->busy, 0);
}

/* The in-flight counters change atomically: the egress adds to them without the lock. */
static __always_inline void lr_add(__u64 *v, __s64 d)
{
	__sync_fetch_and_add(v, d);
}

/* sent_end = max(sent_end, end), against concurrent senders. */
static __always_inline void lr_raise(__u64 *v, __u64 end)
{
	__u64 old = *v;

	for (int i = 0; i < 8 && old < end; i++) {
		__u64 seen = __sync_val_compare_and_swap(v, old, end);

		if (seen == old)
			break;
		old = seen;
	}
}

/* One past the largest number the connection handed out: the egress's counter when the slot
 * is a kernel-path connection's (it may run ahead of sent_end while a packet is being built). */
static __always_inline __u64 lr_allocated(__u32 slot, struct fr_moq_recovery *st)
{
	struct fr_moq_state *cs = bpf_map_lookup_elem(&fr_moq_state, &slot);

	return cs ? lr_max(cs->next_pn, st->sent_end) : st->sent_end;
}

static __always_inline struct fr_moq_sent_pkt *lr_outstanding(struct lr *c, __u64 pn)
{
	struct fr_moq_sent_pkt *e = &c->tb->pkts[BOUNDED(pn, LR_MASK)];

	return e->gen == c->st->gen && e->state == FR_MOQ_PKT_OUTSTANDING && e->pn == pn ? e : NULL;
}

/* Report pn in out[] (lost_ranges or acked_ranges): extends the last range unless `split`. */
static __always_inline void lr_report(struct fr_moq_recover_args *io, struct fr_moq_ack_range *out, __u32 *n,
				      __u64 pn, int split)
{
	__u32 k = *n;

	if (k && !split) {
		out[BOUNDED(k - 1, LR_OUT_MASK)].largest = pn;
		return;
	}
	if (k >= FR_MOQ_LR_MAX_RANGES) {
		io->out_flags |= FR_MOQ_LR_TRUNCATED;
		return;
	}
	out[BOUNDED(k, LR_OUT_MASK)].smallest = pn;
	out[BOUNDED(k, LR_OUT_MASK)].largest = pn;
	*n = k + 1;
}

/* get_probe_timeout(): the PTO period without backoff. */
static __always_inline __u64 lr_pto(struct fr_moq_recovery *st)
{
	if (!st->rtt_initialized)
		return 2 * st->initial_rtt;
	return st->srtt + lr_max(4 * st->rttvar, LR_GRANULARITY) + st->max_ack_delay;
}

/* ---------------------------------------------------------------- INIT, SENT */
GLOBAL int fr_lr_init(__u32 slot)
{
	struct lr c;
	__u64 mds;

	if (lr_get(slot, &c))
		return FR_MOQ_LR_E_SLOT;
	mds = c.io->bytes;
	if (!c.io->gen || mds < 64 || mds > 65535 || !c.io->initial_rtt_ns)
		return FR_MOQ_LR_E_ARGS;
	__builtin_memset(c.st, 0, sizeof(*c.st));
	c.st->busy = 1;                           /* the caller holds it */
	c.st->ack_delay_exponent = c.io->flags & 0x1f;
	c.st->gen = c.io->gen;
	c.st->base = c.io->pn;
	c.st->sent_end = c.io->pn;
	c.st->max_datagram_size = mds;
	c.st->max_ack_delay = c.io->ack_delay_ns;
	c.st->initial_rtt = c.io->initial_rtt_ns;
	c.st->cwnd = LR_INITIAL_WINDOW * mds;
	c.st->min_rtt = LR_NONE;
	c.st->mon_filtered_min = LR_NONE;
	return FR_MOQ_LR_OK;
}

/* on_packet_sent */
GLOBAL int fr_lr_sent(__u32 slot)
{
	struct fr_moq_sent_pkt *e;
	struct lr c;
	__u64 pn;
	__u32 flags;

	if (lr_get(slot, &c) || c.st->gen != c.io->gen || !c.st->gen)
		return FR_MOQ_LR_E_SLOT;
	pn = c.io->pn;
	flags = c.io->flags;
	if (pn < c.st->base)
		return FR_MOQ_LR_E_PN;
	if (pn - c.st->base >= FR_MOQ_SENT_SLOTS)
		return FR_MOQ_LR_E_FULL;
	if (c.io->bytes > 0xffff)
		return FR_MOQ_LR_E_ARGS;
	if (lr_outstanding(&c, pn))
		return FR_MOQ_LR_E_PN;
	e = &c.tb->pkts[BOUNDED(pn, LR_MASK)];
	if (e->pn == pn && e->gen == c.st->gen && e->state == FR_MOQ_PKT_ACKED)
		return FR_MOQ_LR_ACKED_EARLY;         /* registered after its ACK (see fr_lr_ack_step) */
	e->pn = pn;
	e->sent_time = c.io->time_ns;
	e->gen = c.st->gen;
	e->bytes = c.io->bytes;
	e->flags = flags;
	e->nframes = 0;
	e->state = FR_MOQ_PKT_OUTSTANDING;
	lr_raise(&c.st->sent_end, pn + 1);
	if (!(flags & FR_MOQ_PKT_KERNEL))
		lr_add(&c.st->user_outstanding, 1);
	if (flags & FR_MOQ_PKT_ACK_ELICITING)
		lr_add(&c.st->ack_eliciting_in_flight, 1);
	if (flags & FR_MOQ_PKT_IN_FLIGHT) {
		if (flags & FR_MOQ_PKT_ACK_ELICITING)
			c.st->time_of_last_ack_eliciting = lr_max(c.st->time_of_last_ack_eliciting, c.io->time_ns);
		lr_add(&c.st->bytes_in_flight, c.io->bytes);
	}
	return FR_MOQ_LR_OK;
}

/* ---------------------------------------------------------------- ACK */
/* The ranges are well formed (highest first, disjoint, none above the largest number sent);
 * clears the results and raises largest_acked. */
GLOBAL int fr_lr_ack_check(__u32 slot)
{
	struct fr_moq_ack_range *r, *prev;
	struct lr c;
	__u32 n, i;

	if (lr_get(slot, &c) || c.st->gen != c.io->gen || !c.st->gen)
		return FR_MOQ_LR_E_SLOT;
	n = c.io->nranges;
	if (n < 1 || n > FR_MOQ_MAX_ACK_RANGES)
		return FR_MOQ_LR_E_ARGS;
	if (c.io->ranges[0].largest >= lr_allocated(slot, c.st))
		return FR_MOQ_LR_E_ARGS;          /* acknowledges a number never sent */
	for (i = 0; i < FR_MOQ_MAX_ACK_RANGES; i++) {
		if (i >= n)
			break;
		r = &c.io->ranges[BOUNDED(i, LR_RANGE_MASK)];
		if (r->smallest > r->largest)
			return FR_MOQ_LR_E_ARGS;
		if (i) {
			prev = &c.io->ranges[BOUNDED(i - 1, LR_RANGE_MASK)];
			if (r->largest >= prev->smallest)
				return FR_MOQ_LR_E_ARGS;
		}
	}
	if (c.io->ranges[0].largest > c.st->largest_acked)
		c.st->largest_acked = c.io->ranges[0].largest;
	return FR_MOQ_LR_OK;
}

/* The ACK walk, lowest range first and upwards in each, as aioquic visits them. */
struct lr_ack_walk {
	__u32 slot;
	__s32 ri;                    /* range being walked (nranges - 1 down to 0) */
	__u64 pn;
	__u64 end;                   /* numbers handed out (lr_allocated) */
	__u64 largest_newly;
	__u64 largest_sent_time;
	__u8 any;                    /* something newly acked */
	__u8 eliciting;              /* ... and something of it ack-eliciting */
	__u8 open;                   /* this range already reported an acked packet */
	__u8 pad[5];
};

/* NewReno on_packet_acked */
static __always_inline void lr_cc_acked(struct fr_moq_recovery *st, struct fr_moq_sent_pkt *e)
{
	__u64 count;

	lr_add(&st->bytes_in_flight, -(__s64)e->bytes);
	if (e->sent_time <= st->recovery_start)
		return;                           /* no increase during congestion recovery */
	if (!st->ssthresh || st->cwnd < st->ssthresh) {
		st->cwnd += e->bytes;             /* slow start */
		return;
	}
	st->stash += e->bytes;                    /* congestion avoidance */
	if (!st->cwnd)
		return;
	count = st->stash / st->cwnd;
	if (count) {
		st->stash -= count * st->cwnd;
		st->cwnd += count * st->max_datagram_size;
	}
}

/* One step: one packet number, or on to the next range; 1 when done. */
GLOBAL int fr_lr_ack_step(struct lr_ack_walk *w)
{
	struct fr_moq_sent_pkt *e;
	struct fr_moq_ack_range *r;
	struct lr c;
	__u64 lo, hi, pn;

	if (!w || w->ri < 0 || w->ri >= FR_MOQ_MAX_ACK_RANGES || lr_get(w->slot, &c) || !w->end)
		return 1;
	r = &c.io->ranges[BOUNDED(w->ri, LR_RANGE_MASK)];
	lo = lr_max(r->smallest, c.st->base);
	hi = lr_min(r->largest, w->end - 1);
	pn = lr_max(w->pn, lo);
	if (pn > hi) {
		w->ri--;
		w->open = 0;
		return w->ri < 0;
	}
	w->pn = pn + 1;
	e = lr_outstanding(&c, pn);
	if (!e) {
		e = &c.tb->pkts[BOUNDED(pn, LR_MASK)];
		if (pn - c.st->base < FR_MOQ_SENT_SLOTS && (e->pn != pn || e->gen != c.st->gen)) {
			/* handed out, not registered yet (userspace registers its own packets from
			 * their records): its registration finds it acknowledged */
			e->pn = pn;
			e->gen = c.st->gen;
			e->flags = 0;
			e->state = FR_MOQ_PKT_ACKED;
		}
		return 0;
	}
	e->state = FR_MOQ_PKT_ACKED;
	if (!(e->flags & FR_MOQ_PKT_KERNEL))
		lr_add(&c.st->user_outstanding, -1);
	if (e->flags & FR_MOQ_PKT_ACK_ELICITING) {
		w->eliciting = 1;
		lr_add(&c.st->ack_eliciting_in_flight, -1);
	}
	if (e->flags & FR_MOQ_PKT_IN_FLIGHT)
		lr_cc_acked(c.st, e);
	w->any = 1;
	w->largest_newly = pn;
	w->largest_sent_time = e->sent_time;
	c.io->acked++;
	c.st->acked_total++;
	lr_report(c.io, c.io->acked_ranges, &c.io->nacked_ranges, pn, !w->open);
	w->open = 1;
	return 0;
}

static long lr_ack_cb(__u32 i, void *ctx)
{
	return CB_RESULT(fr_lr_ack_step(ctx));
}

/* QuicRttMonitor.is_rtt_increasing (HyStart): 1 when slow start should end. */
static __always_inline int lr_rtt_increasing(struct fr_moq_recovery *st, __u64 now, __u64 rtt)
{
	__s64 delta, filtered;
	__u64 s, lo, hi;
	__u32 i;

	if (now <= st->mon_sample_time + LR_GRANULARITY)
		return 0;
	st->mon_samples[BOUNDED(st->mon_idx, 7)] = rtt;  /* mon_idx < FR_MOQ_RTT_SAMPLES <= 8 */
	st->mon_idx++;
	if (st->mon_idx >= FR_MOQ_RTT_SAMPLES) {
		st->mon_idx = 0;
		st->mon_ready = 1;
	}
	st->mon_sample_time = now;
	if (!st->mon_ready)
		return 0;
	lo = hi = st->mon_samples[0];
	for (i = 1; i < FR_MOQ_RTT_SAMPLES; i++) {
		s = st->mon_samples[i];
		if (s < lo)
			lo = s;
		else if (s > hi)
			hi = s;
	}
	st->mon_sample_min = lo;
	st->mon_sample_max = hi;
	if (st->mon_filtered_min == LR_NONE || st->mon_filtered_min > hi)
		st->mon_filtered_min = hi;
	filtered = st->mon_filtered_min;
	delta = (__s64)lo - filtered;
	if (delta * 4 >= filtered) {
		st->mon_increases++;
		if (st->mon_increases >= FR_MOQ_RTT_SAMPLES)
			return 1;
	} else if (delta > 0) {
		st->mon_increases = 0;
	}
	return 0;
}

/* The RTT sample of an ACK whose largest number was newly acked and which acked an
 * ack-eliciting packet (aioquic's on_ack_received), and HyStart's look at it. */
GLOBAL int fr_lr_rtt_sample(__u32 slot, struct lr_ack_walk *w)
{
	__u64 now, raw, latest, ack_delay, diff;
	struct lr c;

	if (!w || lr_get(slot, &c))
		return 0;
	if (!w->any || !w->eliciting || w->largest_newly != c.io->ranges[0].largest)
		return 0;
	now = c.io->time_ns;
	raw = now > w->largest_sent_time ? now - w->largest_sent_time : 0;
	ack_delay = lr_min(c.io->ack_delay_ns, c.st->max_ack_delay);
	latest = lr_max(raw, LR_GRANULARITY);
	if (latest < c.st->min_rtt)
		c.st->min_rtt = latest;
	if (latest > c.st->min_rtt + ack_delay)
		latest -= ack_delay;
	c.st->latest_rtt = latest;
	if (!c.st->rtt_initialized) {
		c.st->first_sample_time = now;
		c.st->rtt_initialized = 1;
		c.st->rttvar = raw / 2;
		c.st->srtt = raw;
	} else {
		diff = c.st->min_rtt > latest ? c.st->min_rtt - latest : latest - c.st->min_rtt;
		c.st->rttvar = (3 * c.st->rttvar + diff) / 4;
		c.st->srtt = (7 * c.st->srtt + latest) / 8;
	}
	if (!c.st->ssthresh && lr_rtt_increasing(c.st, now, raw))
		c.st->ssthresh = c.st->cwnd;
	c.io->out_flags |= FR_MOQ_LR_RTT_SAMPLE;
	return 1;
}

/* ---------------------------------------------------------------- loss detection */
/* A packet declared lost or given up: a kernel-built one is reported (userspace re-sends its
 * bytes from the relay's cache); userspace's own are aioquic's to detect. */
static __always_inline void lr_gone(struct lr *c, struct fr_moq_sent_pkt *e, __u8 flags)
{
	struct fr_moq_lost rec = { .kind = FR_MOQ_REC_LOST };

	if (!(e->flags & FR_MOQ_PKT_KERNEL)) {
		lr_add(&c->st->user_outstanding, -1);
		return;
	}
	rec.flags = flags | (e->flags & FR_MOQ_PKT_RECORDED ? FR_MOQ_LOST_RECORDED : 0);
	rec.nframes = e->nframes;
	rec.slot = c->io->slot;
	rec.gen = e->gen;
	rec.bytes = e->bytes;
	rec.pn = e->pn;
	__builtin_memcpy(rec.frames, e->frames, sizeof(rec.frames));
	count(flags & FR_MOQ_LOST_EXPIRED ? FR_MQ_LR_EXPIRED : FR_MQ_LR_LOST);
	if (bpf_ringbuf_output(&fr_moq_events, &rec, sizeof(rec), BPF_RB_FORCE_WAKEUP))
		count(FR_MQ_RINGBUF_FULL);
}

struct lr_loss_walk {
	__u32 slot;
	__u8 split;                  /* an outstanding packet kept since the last lost one */
	__u8 lost_cc;                /* an in-flight packet was lost */
	__u8 persistent;
	__u8 have_prev;
	__u8 have_start;
	__u8 base_found;
	__u8 walked;                 /* the walk was set up */
	__u8 pad[5];
	__u64 pn;
	__u64 end;                   /* last number walked (largest_acked or below) */
	__u64 now;
	__u64 loss_delay;
	__u64 pc_duration;           /* persistent congestion duration, 0 before an RTT sample */
	__u64 prev_lost;
	__u64 start_time;
	__u64 lost_largest_time;
	__u64 loss_time;
};

/* _detect_loss: one packet number; 1 when done. */
GLOBAL int fr_lr_loss_step(struct lr_loss_walk *w)
{
	struct fr_moq_sent_pkt *e;
	struct lr c;
	__u64 pn, t;

	if (!w || w->pn > w->end || lr_get(w->slot, &c))
		return 1;
	pn = w->pn++;
	e = lr_outstanding(&c, pn);
	if (!e)
		return 0;
	if (pn + LR_PACKET_THRESHOLD > c.st->largest_acked && e->sent_time + w->loss_delay > w->now) {
		t = e->sent_time + w->loss_delay;    /* kept, for now */
		if (!w->loss_time || t < w->loss_time)
			w->loss_time = t;
		w->split = 1;
		if (!w->base_found) {
			w->base_found = 1;
			c.st->base = pn;
		}
		return 0;
	}
	e->state = FR_MOQ_PKT_LOST;
	lr_gone(&c, e, 0);
	if (e->flags & FR_MOQ_PKT_ACK_ELICITING)
		lr_add(&c.st->ack_eliciting_in_flight, -1);
	if (e->flags & FR_MOQ_PKT_IN_FLIGHT) {
		lr_add(&c.st->bytes_in_flight, -(__s64)e->bytes);
		w->lost_cc = 1;
		w->lost_largest_time = e->sent_time;
	}
	c.io->lost++;
	c.st->lost_total++;
	lr_report(c.io, c.io->lost_ranges, &c.io->nlost_ranges, pn, w->split);
	w->split = 0;
	/* _in_persistent_congestion: a run of consecutive numbers, ack-eliciting packets sent
	 * after the first RTT sample spanning more than the duration */
	if (w->have_prev && pn != w->prev_lost + 1)
		w->have_start = 0;
	w->prev_lost = pn;
	w->have_prev = 1;
	if (w->pc_duration && (e->flags & FR_MOQ_PKT_ACK_ELICITING) && e->sent_time > c.st->first_sample_time) {
		if (!w->have_start) {
			w->have_start = 1;
			w->start_time = e->sent_time;
		} else if (e->sent_time - w->start_time > w->pc_duration) {
			w->persistent = 1;
		}
	}
	return 0;
}

static long lr_loss_cb(__u32 i, void *ctx)
{
	return CB_RESULT(fr_lr_loss_step(ctx));
}

/* Set up the loss walk over [base, min(largest_acked, sent_end - 1)]. */
GLOBAL int fr_lr_loss_begin(__u32 slot, struct lr_loss_walk *w)
{
	struct lr c;
	__u64 rtt;

	if (!w || lr_get(slot, &c) || !c.st->sent_end)
		return 1;
	rtt = c.st->rtt_initialized ? lr_max(c.st->latest_rtt, c.st->srtt) : c.st->initial_rtt;
	w->slot = slot;
	w->pn = c.st->base;
	w->end = lr_min(c.st->largest_acked, c.st->sent_end - 1);
	w->now = c.io->time_ns;
	w->loss_delay = rtt * 9 / 8;
	w->pc_duration = c.st->rtt_initialized ? 3 * lr_pto(c.st) : 0;
	w->walked = 1;
	return w->pn > w->end;
}

/* After the walk: the loss timer, base, and NewReno's on_packets_lost / on_persistent_congestion. */
GLOBAL int fr_lr_loss_end(__u32 slot, struct lr_loss_walk *w)
{
	struct lr c;
	__u64 mds;

	if (!w || lr_get(slot, &c))
		return 0;
	c.st->loss_time = w->loss_time;
	if (w->walked && !w->base_found && w->end + 1 > c.st->base)
		c.st->base = w->end + 1;
	if (!w->lost_cc)
		return 0;
	mds = c.st->max_datagram_size;
	if (w->lost_largest_time > c.st->recovery_start) {
		c.st->recovery_start = w->now;
		c.st->cwnd = lr_max(c.st->cwnd / 2, LR_MINIMUM_WINDOW * mds);
		c.st->ssthresh = c.st->cwnd;
		c.io->out_flags |= FR_MOQ_LR_CONGESTION;
	}
	if (w->persistent) {
		c.st->cwnd = LR_MINIMUM_WINDOW * mds;
		c.st->recovery_start = 0;
		c.io->out_flags |= FR_MOQ_LR_PERSISTENT;
	}
	return 1;
}

static __always_inline void lr_detect_loss(__u32 slot)
{
	struct lr_loss_walk w = {};

	if (!fr_lr_loss_begin(slot, &w))
		bpf_loop(FR_MOQ_SENT_SLOTS + 1, lr_loss_cb, &w, 0);
	fr_lr_loss_end(slot, &w);           /* an empty walk leaves no loss timer, as in aioquic */
}

/* ---------------------------------------------------------------- PTO */
struct lr_pto_walk {
	__u32 slot;
	__u8 base_found;
	__u8 pad[3];
	__u64 pn;
};

/* reschedule_data: the oldest ack-eliciting packet is given up (not a congestion event) so its
 * data goes into the probe; one packet number per step, 1 when done. */
GLOBAL int fr_lr_pto_step(struct lr_pto_walk *w)
{
	struct fr_moq_sent_pkt *e;
	struct lr c;
	__u64 pn;

	if (!w || lr_get(w->slot, &c) || w->pn >= c.st->sent_end)
		return 1;
	pn = w->pn++;
	e = lr_outstanding(&c, pn);
	if (!e)
		return 0;
	if (!(e->flags & FR_MOQ_PKT_ACK_ELICITING)) {
		if (!w->base_found) {
			w->base_found = 1;
			c.st->base = pn;
		}
		return 0;
	}
	e->state = FR_MOQ_PKT_EXPIRED;
	lr_gone(&c, e, FR_MOQ_LOST_EXPIRED);
	lr_add(&c.st->ack_eliciting_in_flight, -1);
	if (e->flags & FR_MOQ_PKT_IN_FLIGHT)
		lr_add(&c.st->bytes_in_flight, -(__s64)e->bytes);
	if (!w->base_found) {
		w->base_found = 1;
		c.st->base = pn + 1;
	}
	c.io->expired++;
	c.st->expired_total++;
	lr_report(c.io, c.io->lost_ranges, &c.io->nlost_ranges, pn, 1);
	return 1;
}

static long lr_pto_cb(__u32 i, void *ctx)
{
	return CB_RESULT(fr_lr_pto_step(ctx));
}

/* TIMEOUT with no loss timer armed: pto_count++ and the walk set up; 1 if there is nothing to walk. */
GLOBAL int fr_lr_pto_begin(__u32 slot, struct lr_pto_walk *w)
{
	struct lr c;

	if (!w || lr_get(slot, &c))
		return 1;
	c.st->pto_count++;
	w->slot = slot;
	w->pn = c.st->base;
	return w->pn >= c.st->sent_end;
}

/* Base when the PTO walk found no outstanding packet. */
GLOBAL int fr_lr_pto_end(__u32 slot, struct lr_pto_walk *w)
{
	struct lr c;

	if (!w || lr_get(slot, &c))
		return 0;
	if (!w->base_found)
		c.st->base = c.st->sent_end;
	return 0;
}

/* ---------------------------------------------------------------- results */
/* get_loss_detection_time: 0 = none. */
static __always_inline __u64 lr_timer(struct fr_moq_recovery *st)
{
	__u32 shift;

	if (st->loss_time)
		return st->loss_time;
	if (!st->ack_eliciting_in_flight)
		return 0;
	shift = st->pto_count < LR_MAX_BACKOFF ? st->pto_count : LR_MAX_BACKOFF;
	return st->time_of_last_ack_eliciting + (lr_pto(st) << (shift & 31));
}

/* The loss detection timer and the state the caller gets back. */
GLOBAL int fr_lr_finish(__u32 slot)
{
	struct lr c;

	if (lr_get(slot, &c))
		return 0;
	c.io->timer_ns = lr_timer(c.st);
	c.io->base = c.st->base;
	c.io->cwnd = c.st->cwnd;
	c.io->bytes_in_flight = c.st->bytes_in_flight;
	c.io->srtt = c.st->srtt;
	return 0;
}

/* Clear the results of the call in io. */
GLOBAL int fr_lr_begin(__u32 slot)
{
	struct lr c;

	if (lr_get(slot, &c))
		return FR_MOQ_LR_E_SLOT;
	__builtin_memset(&c.io->status, 0, sizeof(*c.io) - offsetof(struct fr_moq_recover_args, status));
	return FR_MOQ_LR_OK;
}

/* on_ack_received for the ACK in fr_moq_rec_io[slot]; a status. */
GLOBAL int fr_lr_ack(__u32 slot)
{
	struct lr_ack_walk aw = {};
	struct lr c;
	int ret;

	ret = fr_lr_ack_check(slot);
	if (ret)
		return ret;
	if (lr_get(slot, &c))
		return FR_MOQ_LR_E_SLOT;
	aw.slot = slot;
	aw.ri = c.io->nranges - 1;
	aw.end = lr_allocated(slot, c.st);
	bpf_loop(FR_MOQ_SENT_SLOTS + FR_MOQ_MAX_ACK_RANGES + 1, lr_ack_cb, &aw, 0);
	if (!aw.any)
		return FR_MOQ_LR_OK;         /* nothing newly acked: nothing more (aioquic returns) */
	fr_lr_rtt_sample(slot, &aw);
	lr_detect_loss(slot);
	if (lr_get(slot, &c))
		return FR_MOQ_LR_E_SLOT;
	c.st->pto_count = 0;
	return FR_MOQ_LR_OK;
}

/* on_loss_detection_timeout; a status. */
GLOBAL int fr_lr_timeout(__u32 slot)
{
	struct lr_pto_walk pw = {};
	struct lr c;

	if (lr_get(slot, &c) || c.st->gen != c.io->gen || !c.st->gen)
		return FR_MOQ_LR_E_SLOT;
	if (c.st->loss_time) {
		lr_detect_loss(slot);
		return FR_MOQ_LR_OK;
	}
	if (!fr_lr_pto_begin(slot, &pw))
		bpf_loop(FR_MOQ_SENT_SLOTS + 1, lr_pto_cb, &pw, 0);
	fr_lr_pto_end(slot, &pw);
	return FR_MOQ_LR_OK;
}

/* ---------------------------------------------------------------- the slot's bpf_timer */
static int lr_timer_cb(void *map, __u32 *key, struct lr_timer *v)
{
	struct fr_moq_timer rec = { .kind = FR_MOQ_REC_TIMER };
	struct fr_moq_recovery *st;
	__u32 slot = *key;
	__u64 due, now;

	st = bpf_map_lookup_elem(&fr_moq_rec, &slot);
	if (!st || !st->gen || st->gen != v->gen)
		return 0;
	/* userspace is woken only for a timeout that is due (read without the lock: the timeout
	 * itself checks again under it) */
	due = lr_timer(st);
	now = bpf_ktime_get_ns();
	if (!due) {
		st->timer_at = 0;                 /* nothing outstanding any more */
		return 0;
	}
	if (due > now + LR_TIMER_SLACK) {         /* moved later meanwhile */
		st->timer_at = due;
		bpf_timer_start(&v->t, due - now, 0);
		return 0;
	}
	st->timer_at = 0;
	rec.slot = slot;
	rec.gen = st->gen;
	rec.time_ns = now;
	count(FR_MQ_LR_TIMERS);
	if (bpf_ringbuf_output(&fr_moq_events, &rec, sizeof(rec), BPF_RB_FORCE_WAKEUP))
		count(FR_MQ_RINGBUF_FULL);
	return 0;
}

/* Arm the slot's timer to fire at `at` (CLOCK_MONOTONIC ns; 0: disarm). */
GLOBAL int fr_lr_arm(__u32 slot, __u64 at)
{
	struct fr_moq_recovery *st = bpf_map_lookup_elem(&fr_moq_rec, &slot);
	struct lr_timer *v = bpf_map_lookup_elem(&fr_moq_rec_timer, &slot);
	__u64 now = bpf_ktime_get_ns();

	if (!st || !v || !st->gen)
		return 0;
	if (v->gen != st->gen) {
		bpf_timer_init(&v->t, &fr_moq_rec_timer, CLOCK_MONOTONIC);   /* -EBUSY once set up: fine */
		v->gen = st->gen;
	}
	st->timer_at = at;
	if (!at)
		return bpf_timer_cancel(&v->t) < 0;
	/* the callback again before every start: on this kernel a timer that was cancelled or
	 * fired may have lost it (bpf_timer_start then fails with -EINVAL) */
	bpf_timer_set_callback(&v->t, lr_timer_cb);
	return bpf_timer_start(&v->t, at > now ? at - now : 0, 0) != 0;
}

/* One operation on slot (its argument already in fr_moq_rec_io[slot]), holding its lock; a
 * status. The timer follows the result. */
static __always_inline int lr_run(__u32 slot, __u32 op)
{
	struct lr c;
	__u64 due;
	int ret;

	ret = fr_lr_begin(slot);
	if (ret)
		return ret;
	switch (op) {
	case FR_MOQ_LR_INIT:
		ret = fr_lr_init(slot);
		break;
	case FR_MOQ_LR_SENT:
		ret = fr_lr_sent(slot);
		break;
	case FR_MOQ_LR_ACK:
		ret = fr_lr_ack(slot);
		break;
	case FR_MOQ_LR_TIMEOUT:
		ret = fr_lr_timeout(slot);
		break;
	case FR_MOQ_LR_EXPIRE:
		if (lr_get(slot, &c) || c.st->gen != c.io->gen || !c.st->gen)
			return FR_MOQ_LR_E_SLOT;
		due = lr_timer(c.st);
		if (due && due <= c.io->time_ns)
			ret = fr_lr_timeout(slot);
		break;
	default:
		return FR_MOQ_LR_E_ARGS;
	}
	if (ret && ret != FR_MOQ_LR_ACKED_EARLY)
		return ret;
	fr_lr_finish(slot);
	if (op != FR_MOQ_LR_INIT && lr_get(slot, &c) == 0 && (op != FR_MOQ_LR_SENT || !c.st->timer_at))
		fr_lr_arm(slot, c.io->timer_ns);
	return ret;
}

/* lr_run with the slot's lock: FR_MOQ_LR_E_BUSY if another call holds it. */
static __always_inline int lr_run_locked(__u32 slot, __u32 op)
{
	struct fr_moq_recovery *st = bpf_map_lookup_elem(&fr_moq_rec, &slot);
	int ret;

	if (!st)
		return FR_MOQ_LR_E_SLOT;
	if (!lr_lock(st))
		return FR_MOQ_LR_E_BUSY;
	ret = lr_run(slot, op);
	lr_unlock(st);
	return ret;
}

/* ---------------------------------------------------------------- the data path's calls */
/* The egress sent packet pn (len bytes) it built from scratch.sent: registered without the
 * lock (see the top). FR_MOQ_PKT_RECORDED when its stream frames do not fit the entry. */
static __always_inline void lr_register(struct scratch *s, struct fr_moq_recovery *st, struct fr_moq_sent_table *tb,
					__u32 slot, __u64 pn, __u32 len, __u64 now)
{
	struct fr_moq_sent_pkt *e = &tb->pkts[BOUNDED(pn, LR_MASK)];
	struct fr_moq_sent_frame *f;
	__u8 flags = FR_MOQ_PKT_KERNEL | FR_MOQ_PKT_ACK_ELICITING | FR_MOQ_PKT_IN_FLIGHT;
	__u32 n = 0, i;

	e->pn = pn;
	e->sent_time = now;
	e->gen = st->gen;
	e->bytes = len;
	if (s->bs.nout > FR_MOQ_PKT_FRAMES) {
		flags |= FR_MOQ_PKT_RECORDED;
	} else {
		for (i = 0; i < FR_MOQ_PKT_FRAMES; i++) {
			f = &s->sent.frames[i];
			if (i >= s->bs.nout || f->datagram)
				continue;
			e->frames[n & 1].stream = f->stream;
			e->frames[n & 1].offset = f->offset;
			e->frames[n & 1].len = f->len;
			e->frames[n & 1].fin = f->fin;
			n++;
		}
	}
	e->nframes = n;
	e->flags = flags;
	asm volatile("" ::: "memory");            /* the entry before its state */
	e->state = FR_MOQ_PKT_OUTSTANDING;
	lr_raise(&st->sent_end, pn + 1);
	lr_add(&st->ack_eliciting_in_flight, 1);
	lr_add(&st->bytes_in_flight, len);
	if (now > st->time_of_last_ack_eliciting)
		st->time_of_last_ack_eliciting = now;
	if (!st->timer_at)
		fr_lr_arm(slot, lr_timer(st));
}

/* The ACK-only packet in scratch.ack, of connection slot: applied to its recovery. -1: not
 * applied (pass the packet up); else bit 0: userspace's own packets were outstanding (it must
 * see the ACK too), bit 1: the packet goes up anyway (one in FR_MOQ_USER_ACK_EVERY). */
GLOBAL int fr_lr_absorb(__u32 slot, __u32 gen)
{
	struct fr_moq_recovery *st = bpf_map_lookup_elem(&fr_moq_rec, &slot);
	struct fr_moq_recover_args *io = bpf_map_lookup_elem(&fr_moq_rec_io, &slot);
	struct scratch *s = scratch();
	__u64 user, delay, n;
	int ret;

	if (!st || !io || !s || !gen || st->gen != gen)
		return -1;
	if (!lr_lock(st)) {
		count(FR_MQ_LR_BUSY);
		return -1;
	}
	user = st->user_outstanding;
	io->slot = slot;
	io->gen = gen;
	io->op = FR_MOQ_LR_ACK;
	io->nranges = s->ack.nranges;
	__builtin_memcpy(io->ranges, s->ack.ranges, sizeof(io->ranges));
	delay = s->ack.ack_delay < (1ULL << 24) ? s->ack.ack_delay : (1ULL << 24);
	io->ack_delay_ns = (delay << (st->ack_delay_exponent & 0x1f)) * 1000;
	io->time_ns = s->ack.time_ns;
	ret = lr_run(slot, FR_MOQ_LR_ACK);
	n = ++st->absorbed;
	lr_unlock(st);
	if (ret)
		return -1;                        /* malformed for this connection: aioquic decides */
	return (user ? 1 : 0) | (n % FR_MOQ_USER_ACK_EVERY ? 0 : 2);
}

#endif /* FR_MOQ_RECOVERY_H */
