// SPDX-License-Identifier: GPL-2.0
/*
 * ism_dibs: a DIBS driver for ism-backend's ISM-compatible virtio device.
 *
 * The device (docs/device-abi.md, ABI version 2) is offered by ism-backend
 * through vhost-user; this module drives it and registers it as a dibs
 * device, so the kernel's SMC uses it for SMC-D between guests.
 *
 * Every request is one descriptor chain on the request queue, sent with the
 * queue's spinlock held and polled to completion: SMC calls move_data under
 * its own spinlocks, so no op may sleep. Signals into our DMBs are counters
 * in the SBA, which only the device writes; a timer polls them (see
 * ism_poll) because the virtio core's interrupt handler ignores interrupts
 * that bring no used buffer.
 */

#include <linux/bitmap.h>
#include <linux/dibs.h>
#include <linux/hrtimer.h>
#include <linux/io.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/vmalloc.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>

/* Config space (docs/device-abi.md "Config space"). */
#define ISM_MAGIC		0x764D5349
#define ISM_VERSION		2
#define ISM_CFG_MAGIC		0
#define ISM_CFG_VERSION		4
#define ISM_CFG_MODES		6
#define ISM_CFG_GID		8
#define ISM_CFG_CHID		16
#define ISM_CFG_MAX_DMBS	20
#define ISM_CFG_MAX_DMB_SIZE	24
#define ISM_CFG_MAX_MOVE_LEN	28
#define ISM_CFG_SHM_SIZE	32
#define ISM_CFG_QUEUE_SIZE	40
#define ISM_CFG_HEARTBEAT_MS	42

#define ISM_MODE_COPY		BIT(0)
#define ISM_MODE_ATTACH		BIT(1)

/* Limits of ABI version 2. */
#define ISM_MAX_DMBS		1920
#define ISM_MAX_DMBES		32
#define ISM_SHM_PAGE		4096

/* Ops and flags of the request header. */
enum {
	ISM_OP_REGISTER_DMB	= 1,
	ISM_OP_UNREGISTER_DMB	= 2,
	ISM_OP_MOVE		= 3,
	ISM_OP_SIGNAL		= 4,
	ISM_OP_QUERY_RGID	= 5,
	ISM_OP_SET_SBA		= 6,
	ISM_OP_ATTACH_DMB	= 7,
	ISM_OP_DETACH_DMB	= 8,
};

#define ISM_FLAG_SIGNAL		BIT(0)	/* MOVE */
#define ISM_FLAG_INTERRUPTS	BIT(0)	/* SET_SBA */
#define ISM_FLAG_ATTACH		BIT(0)	/* REGISTER_DMB */

enum {
	ISM_ST_OK		= 0,
	ISM_ST_INVALID		= 1,
	ISM_ST_UNSUPPORTED	= 2,
	ISM_ST_NOENTRY		= 3,
	ISM_ST_PERMISSION	= 4,
	ISM_ST_RANGE		= 5,
	ISM_ST_FAULT		= 6,
	ISM_ST_NOSPACE		= 7,
	ISM_ST_BUSY		= 8,
	ISM_ST_NOTREADY		= 9,
	ISM_ST_INTERNAL		= 10,
};

struct ism_req_hdr {
	__le16 op;
	__le16 flags;
	__le32 index;
	__le64 token;
	__le64 offset;
	__le64 len;
	__le64 gid;
	__le64 addr;
} __packed;

struct ism_resp {
	__le32 status;
	__le32 index;
	__le64 value;
} __packed;

/* Event types of the event queue. */
enum {
	ISM_EV_DMB = 0,
	ISM_EV_GID = 1,
	ISM_EV_SWR = 2,
};

struct ism_event {
	__le16 type;
	__le16 code;
	__le32 reserved;
	__le64 token;
	__le64 gid;
	__le64 info;
} __packed;

/* The signalling block (docs/device-abi.md "Signalling block"). */
#define ISM_SBA_SIZE		(128 * 1024)
#define ISM_SBA_SUM		0
#define ISM_SBA_HEARTBEAT	4
#define ISM_SBA_GROUP(g)	(64 + 4 * (g))
#define ISM_SBA_SEQ(i)		(192 + 4 * (i))
#define ISM_SBA_DMBE(i, e)	(8192 + 64 * (i) + 2 * (e))
#define ISM_SBA_GROUPS		30
#define ISM_DMBS_PER_GROUP	64

/*
 * A MOVE is split into pieces of at most this many bytes (and at most the
 * device's max_move_len), so one piece's data fits in ISM_MAX_DATA_SG
 * segments of a page each, whatever the data's alignment.
 */
#define ISM_MOVE_PIECE		(16 * PAGE_SIZE)
#define ISM_MAX_DATA_SG		(ISM_MOVE_PIECE / PAGE_SIZE + 1)

#define ISM_NR_EVBUFS		64

/* Before SET_SBA there is no heartbeat: a request gets this long. */
#define ISM_NO_BEAT_TIMEOUT_NS	(10ULL * NSEC_PER_SEC)

/* Signal polling: fast while signals come, slower while idle. */
#define ISM_POLL_MIN_NS		(100 * NSEC_PER_USEC)

static unsigned int virtio_id = 38;
module_param(virtio_id, uint, 0444);
MODULE_PARM_DESC(virtio_id, "virtio device id of the ISM device (ism-backend -virtio-id), default 38");

static unsigned int poll_max_us = 2000;
module_param(poll_max_us, uint, 0644);
MODULE_PARM_DESC(poll_max_us, "longest pause (us) between looks at the SBA while no signal comes, default 2000");

static bool use_attach = true;
module_param(use_attach, bool, 0444);
MODULE_PARM_DESC(use_attach, "use attach mode when the device offers it (default true)");

/* One of our own DMBs, by DMB index. */
struct ism_own_dmb {
	u64 token;		/* 0: index free */
	u64 rgid;
	void *cpu_addr;
	u32 len;
	bool attached;		/* attach mode: lives in the shm region */
};

/* One peer DMB we attached (for detaching what is left at remove). */
struct ism_attachment {
	struct list_head list;
	u64 token;
};

struct ism_vdev {
	struct virtio_device *vdev;
	struct dibs_dev *dibs;
	struct virtqueue *reqq;
	struct virtqueue *evq;

	/* config, read once */
	u16 modes;
	u64 gid;
	u16 chid;
	u32 max_dmbs;
	u32 max_dmb_size;
	u32 max_move_len;
	u64 shm_size;
	u16 heartbeat_ms;

	/* request queue: one chain in flight, polled under req_lock */
	spinlock_t req_lock;
	struct ism_req_hdr *hdr;	/* kmalloc'd: the device reads it */
	struct ism_resp *resp;		/* kmalloc'd: the device writes it */
	struct scatterlist data_sg[ISM_MAX_DATA_SG];
	bool dead;			/* backend gone or ring broken */
	bool sba_set;
	u64 dead_after_ns;

	/* SBA and the driver's copies of its counters (sig_lock) */
	spinlock_t sig_lock;
	void *sba;
	u32 sum_seen;
	u32 group_seen[ISM_SBA_GROUPS];
	u32 *seq_seen;			/* [ISM_MAX_DMBS] */
	u16 *dmbe_seen;			/* [ISM_MAX_DMBS][ISM_MAX_DMBES] */
	struct hrtimer poll_timer;
	u64 poll_ns;
	u32 timer_beat;			/* the heartbeat as the timer last saw it */
	u64 timer_beat_ns;		/* ... and since when */

	/* event queue (ev_lock) */
	spinlock_t ev_lock;
	struct ism_event *evbufs;
	unsigned int nr_evbufs;

	/* own DMBs and attachments (dmb_lock) */
	spinlock_t dmb_lock;
	unsigned long *idx_map;		/* [max_dmbs] */
	struct ism_own_dmb *own;	/* [max_dmbs] */
	struct list_head attachments;

	/* attach mode: the shared-memory region, mapped WB once */
	bool attach;
	void *shm;
	phys_addr_t shm_phys;
	u64 shm_len;
};

static int ism_status_errno(u32 st)
{
	switch (st) {
	case ISM_ST_OK:		 return 0;
	case ISM_ST_INVALID:	 return -EINVAL;
	case ISM_ST_UNSUPPORTED: return -EOPNOTSUPP;
	case ISM_ST_NOENTRY:	 return -ENOENT;
	case ISM_ST_PERMISSION:	 return -EACCES;
	case ISM_ST_RANGE:	 return -ERANGE;
	case ISM_ST_FAULT:	 return -EFAULT;
	case ISM_ST_NOSPACE:	 return -ENOSPC;
	case ISM_ST_BUSY:	 return -EBUSY;
	case ISM_ST_NOTREADY:	 return -EAGAIN;
	case ISM_ST_INTERNAL:	 return -EIO;
	}
	return -EPROTO;
}

static u32 ism_sba32(struct ism_vdev *iv, unsigned int off)
{
	return le32_to_cpu(READ_ONCE(*(__le32 *)(iv->sba + off)));
}

static u16 ism_sba16(struct ism_vdev *iv, unsigned int off)
{
	return le16_to_cpu(READ_ONCE(*(__le16 *)(iv->sba + off)));
}

/* Our GID as a dibs uuid: bytes 0..7 big-endian GID, 8..15 gid_ext = 0. */
static void ism_gid_to_uuid(uuid_t *u, u64 gid)
{
	__be64 be = cpu_to_be64(gid);

	memset(u, 0, sizeof(*u));
	memcpy(u->b, &be, sizeof(be));
}

/* The 64-bit GID of a dibs uuid; 0 if gid_ext is set (never ours). */
static u64 ism_uuid_to_gid(const uuid_t *u)
{
	__be64 gid, ext;

	memcpy(&gid, u->b, sizeof(gid));
	memcpy(&ext, u->b + 8, sizeof(ext));
	if (ext)
		return 0;
	return be64_to_cpu(gid);
}

/* Call with req_lock held. Returns true the first time. */
static bool ism_mark_dead(struct ism_vdev *iv, const char *why)
{
	if (iv->dead)
		return false;
	dev_err_ratelimited(&iv->vdev->dev,
			    "device unusable (%s): every request fails with -EIO from now on\n",
			    why);
	iv->dead = true;
	return true;
}

static void ism_deliver_event(struct ism_vdev *iv, const struct dibs_event *ev);

/*
 * A dead device reaches no peer: tell the clients each peer we hold a DMB
 * for is gone (DIBS_DEV_EVENT, as for an EventGID), so SMC ends those link
 * groups and its writers fail instead of waiting for cursor updates that
 * can no longer come.
 */
static void ism_peers_gone(struct ism_vdev *iv)
{
	struct dibs_event ev = {
		.type = DIBS_DEV_EVENT,
		.subtype = DIBS_DEV_ERR_STATE,
	};
	unsigned long flags;
	u64 last = 0;
	unsigned int i;

	ev.time = ktime_get_real_ns();
	spin_lock_irqsave(&iv->dmb_lock, flags);
	for (i = 0; i < iv->max_dmbs; i++) {
		u64 rgid = iv->own[i].rgid;

		if (!iv->own[i].token || !rgid || rgid == last)
			continue;
		last = rgid;
		ism_gid_to_uuid(&ev.gid, rgid);
		ism_deliver_event(iv, &ev);
	}
	spin_unlock_irqrestore(&iv->dmb_lock, flags);
}

/*
 * Add data[0..len) to iv->data_sg, a page per segment. SMC's CDC messages
 * live on the stack, which may be vmalloc'd; DMB memory is linear.
 */
static int ism_data_sg(struct ism_vdev *iv, void *data, unsigned int len)
{
	unsigned int n = 0;

	sg_init_table(iv->data_sg, ISM_MAX_DATA_SG);
	while (len) {
		unsigned int off = offset_in_page(data);
		unsigned int chunk = min_t(unsigned int, len, PAGE_SIZE - off);
		struct page *page;

		if (n == ISM_MAX_DATA_SG)
			return -EINVAL;
		if (iv->shm && data >= iv->shm && data < iv->shm + iv->shm_len)
			return -EFAULT;	/* BAR memory has no struct page */
		if (is_vmalloc_addr(data))
			page = vmalloc_to_page(data);
		else if (virt_addr_valid(data))
			page = virt_to_page(data);
		else
			return -EFAULT;	/* e.g. an address in the shm region */
		if (!page)
			return -EFAULT;
		sg_set_page(&iv->data_sg[n++], page, chunk, off);
		data += chunk;
		len -= chunk;
	}
	if (n)
		sg_mark_end(&iv->data_sg[n - 1]);
	return n;
}

/*
 * ism_do sends one request and spins until the device completes it. It
 * never sleeps: SMC calls move_data with spinlocks held. data is MOVE's
 * payload (len bytes), NULL otherwise. On success *resp holds the response;
 * the return value is the status as an errno.
 */
static int ism_do(struct ism_vdev *iv, const struct ism_req_hdr *req,
		  void *data, unsigned int len, struct ism_resp *resp)
{
	struct scatterlist hdr_sg, resp_sg, *sgs[3];
	unsigned int out = 0, used = 0;
	u64 start, beat_ns;
	unsigned long flags;
	bool newly_dead = false;
	u32 beat = 0, st;
	void *done;
	int n, rc;

	spin_lock_irqsave(&iv->req_lock, flags);
	if (iv->dead) {
		rc = -EIO;
		goto out;
	}
	*iv->hdr = *req;
	/* A response the device "wrote" without writing reads as unknown. */
	memset(iv->resp, 0xff, sizeof(*iv->resp));
	sg_init_one(&hdr_sg, iv->hdr, sizeof(*iv->hdr));
	sg_init_one(&resp_sg, iv->resp, sizeof(*iv->resp));
	sgs[out++] = &hdr_sg;
	if (len) {
		n = ism_data_sg(iv, data, len);
		if (n < 0) {
			rc = n;
			goto out;
		}
		sgs[out++] = iv->data_sg;
	}
	sgs[out] = &resp_sg;
	rc = virtqueue_add_sgs(iv->reqq, sgs, out, 1, iv, GFP_ATOMIC);
	if (rc)
		goto out;
	/*
	 * Notify every time, ignoring the device's suppression hints: their
	 * store-then-load handshake is not fenced under TCG (device-abi.md,
	 * "Who writes what").
	 */
	virtqueue_notify(iv->reqq);

	start = ktime_get_ns();
	beat_ns = start;
	if (iv->sba_set)
		beat = ism_sba32(iv, ISM_SBA_HEARTBEAT);
	while (!(done = virtqueue_get_buf(iv->reqq, &used))) {
		u64 now = ktime_get_ns();

		if (iv->sba_set && iv->dead_after_ns) {
			u32 b = ism_sba32(iv, ISM_SBA_HEARTBEAT);

			if (b != beat) {
				beat = b;
				beat_ns = now;
			} else if (now - beat_ns >= iv->dead_after_ns) {
				newly_dead = ism_mark_dead(iv, "heartbeat stopped: the backend is gone");
				rc = -EIO;
				goto out;
			}
		} else if (now - start >= ISM_NO_BEAT_TIMEOUT_NS) {
			newly_dead = ism_mark_dead(iv, "request not completed in 10 s");
			rc = -EIO;
			goto out;
		}
		cpu_relax();
	}
	if (done != iv) {
		newly_dead = ism_mark_dead(iv, "request queue completed a chain never sent");
		rc = -EIO;
		goto out;
	}
	if (used == 0) {
		/* The device found the chain malformed and wrote nothing. */
		rc = -EINVAL;
		goto out;
	}
	if (used != sizeof(*iv->resp)) {
		newly_dead = ism_mark_dead(iv, "response of a wrong length");
		rc = -EIO;
		goto out;
	}
	*resp = *iv->resp;
	st = le32_to_cpu(resp->status);
	if (st > ISM_ST_INTERNAL) {
		newly_dead = ism_mark_dead(iv, "unknown response status");
		rc = -EIO;
		goto out;
	}
	rc = ism_status_errno(st);
out:
	spin_unlock_irqrestore(&iv->req_lock, flags);
	if (newly_dead)
		ism_peers_gone(iv);
	return rc;
}

static int ism_simple(struct ism_vdev *iv, u16 op, u16 flags, u32 index,
		      u64 token, u64 offset, u64 len, u64 gid, u64 addr,
		      struct ism_resp *resp)
{
	struct ism_req_hdr req = {
		.op = cpu_to_le16(op),
		.flags = cpu_to_le16(flags),
		.index = cpu_to_le32(index),
		.token = cpu_to_le64(token),
		.offset = cpu_to_le64(offset),
		.len = cpu_to_le64(len),
		.gid = cpu_to_le64(gid),
		.addr = cpu_to_le64(addr),
	};
	struct ism_resp r;

	return ism_do(iv, &req, NULL, 0, resp ? resp : &r);
}

/* ---- signals ---- */

/*
 * ism_scan_sba reads the SBA's counters in the order device-abi.md asks
 * (sum, groups, seqs, dmbes; the device adds in the reverse order), each
 * against our own copy, and calls the owning client's handle_irq for every
 * signalled DMB. It returns whether any DMB was signalled. Call with
 * sig_lock held; it takes dibs->lock.
 */
static bool ism_scan_sba(struct ism_vdev *iv)
{
	struct dibs_dev *dibs = iv->dibs;
	bool any = false;
	unsigned int g, i, e;
	u32 sum, v;

	sum = ism_sba32(iv, ISM_SBA_SUM);
	if (sum == iv->sum_seen)
		return false;
	iv->sum_seen = sum;
	virt_rmb();
	for (g = 0; g < ISM_SBA_GROUPS; g++) {
		unsigned int first = g * ISM_DMBS_PER_GROUP;
		unsigned int last = min(first + ISM_DMBS_PER_GROUP, iv->max_dmbs);

		if (first >= iv->max_dmbs)
			break;
		v = ism_sba32(iv, ISM_SBA_GROUP(g));
		if (v == iv->group_seen[g])
			continue;
		iv->group_seen[g] = v;
		virt_rmb();
		for (i = first; i < last; i++) {
			u16 mask = 0;
			u8 cid;

			v = ism_sba32(iv, ISM_SBA_SEQ(i));
			if (v == iv->seq_seen[i])
				continue;
			iv->seq_seen[i] = v;
			virt_rmb();
			for (e = 0; e < ISM_MAX_DMBES; e++) {
				u16 d = ism_sba16(iv, ISM_SBA_DMBE(i, e));
				u16 *seen = &iv->dmbe_seen[i * ISM_MAX_DMBES + e];

				if (d != *seen) {
					*seen = d;
					/* dibs has 16 bits: DMBE e is bit e % 16 */
					mask |= BIT(e % 16);
				}
			}
			any = true;
			if (!dibs)
				continue;
			spin_lock(&dibs->lock);
			/* NULL until dibs_dev_add has run */
			cid = dibs->dmb_clientid_arr ?
				dibs->dmb_clientid_arr[i] : NO_DIBS_CLIENT;
			if (cid != NO_DIBS_CLIENT && cid < MAX_DIBS_CLIENTS &&
			    dibs->subs[cid])
				dibs->subs[cid]->ops->handle_irq(dibs, i, mask);
			spin_unlock(&dibs->lock);
		}
	}
	return any;
}

static void ism_drain_events(struct ism_vdev *iv);

/*
 * The poll timer watches the heartbeat too: a driver that only waits for
 * its peer (an SMC writer whose peer's cursor does not move) sends no
 * request that would notice the backend gone. A busy req_lock means a
 * request is spinning and watches the heartbeat itself.
 */
static void ism_watch_beat(struct ism_vdev *iv)
{
	u64 now = ktime_get_ns();
	bool newly_dead = false;
	u32 b;

	if (!iv->dead_after_ns || READ_ONCE(iv->dead))
		return;
	b = ism_sba32(iv, ISM_SBA_HEARTBEAT);
	if (b != iv->timer_beat) {
		iv->timer_beat = b;
		iv->timer_beat_ns = now;
		return;
	}
	if (now - iv->timer_beat_ns < iv->dead_after_ns || !spin_trylock(&iv->req_lock))
		return;
	newly_dead = ism_mark_dead(iv, "heartbeat stopped: the backend is gone");
	spin_unlock(&iv->req_lock);
	if (newly_dead)
		ism_peers_gone(iv);
}

static void ism_look(struct ism_vdev *iv)
{
	unsigned long flags;

	spin_lock_irqsave(&iv->sig_lock, flags);
	if (ism_scan_sba(iv))
		iv->poll_ns = ISM_POLL_MIN_NS;
	spin_unlock_irqrestore(&iv->sig_lock, flags);
}

/*
 * The virtio core's vring_interrupt() drops an interrupt that brings no
 * used buffer, so the device's signal interrupts (SET_SBA flag) would never
 * reach us (and would count as spurious). Signals are polled instead: every
 * ISM_POLL_MIN_NS while they come, doubling up to poll_max_us while idle.
 * The timer runs from probe (after the queues are set up) to remove.
 */
static enum hrtimer_restart ism_poll(struct hrtimer *t)
{
	struct ism_vdev *iv = container_of(t, struct ism_vdev, poll_timer);
	u64 max_ns = (u64)max(poll_max_us, 100U) * NSEC_PER_USEC;
	unsigned long flags;
	bool any;

	ism_watch_beat(iv);
	/*
	 * Events too: the event queue's interrupt depends on a used_event
	 * handshake that TCG does not fence (device-abi.md), so one may be
	 * missed; a look at the used ring is one load.
	 */
	ism_drain_events(iv);
	spin_lock_irqsave(&iv->sig_lock, flags);
	any = ism_scan_sba(iv);
	if (any)
		iv->poll_ns = ISM_POLL_MIN_NS;
	else
		iv->poll_ns = min(iv->poll_ns * 2, max_ns);
	hrtimer_forward_now(t, ns_to_ktime(iv->poll_ns));
	spin_unlock_irqrestore(&iv->sig_lock, flags);
	return HRTIMER_RESTART;
}

/* ---- events ---- */

static void ism_deliver_event(struct ism_vdev *iv, const struct dibs_event *ev)
{
	struct dibs_dev *dibs = iv->dibs;
	int i;

	unsigned long flags;

	if (!dibs)
		return;
	spin_lock_irqsave(&dibs->lock, flags);
	for (i = 0; i < MAX_DIBS_CLIENTS; i++)
		if (dibs->subs[i])
			dibs->subs[i]->ops->handle_event(dibs, ev);
	spin_unlock_irqrestore(&dibs->lock, flags);
}

static void ism_handle_event(struct ism_vdev *iv, const struct ism_event *raw)
{
	struct dibs_event ev = {};
	u16 type = le16_to_cpu(raw->type);
	u16 code = le16_to_cpu(raw->code);
	u64 token = le64_to_cpu(raw->token);
	u64 gid = le64_to_cpu(raw->gid);

	ev.time = ktime_get_real_ns();
	switch (type) {
	case ISM_EV_DMB:
		if (!token) {
			dev_warn_ratelimited(&iv->vdev->dev, "DMB event without a token: ignored\n");
			return;
		}
		ev.type = DIBS_BUF_EVENT;
		ev.subtype = DIBS_BUF_UNREGISTERED;
		ev.buffer_tok = token;
		/* code 1: the device revoked it; 0: its owner dropped it */
		ev.data = code;
		break;
	case ISM_EV_GID:
		if (!gid) {
			dev_warn_ratelimited(&iv->vdev->dev, "GID event without a GID: ignored\n");
			return;
		}
		/* SMC takes the gone peer from gid (smc_ism_event_work). */
		ev.type = DIBS_DEV_EVENT;
		ev.subtype = DIBS_DEV_DISABLED;
		break;
	case ISM_EV_SWR:
		if (!gid) {
			dev_warn_ratelimited(&iv->vdev->dev, "software event without a sender: ignored\n");
			return;
		}
		ev.type = DIBS_SW_EVENT;
		ev.subtype = code;
		ev.data = le64_to_cpu(raw->info);
		break;
	default:
		dev_warn_ratelimited(&iv->vdev->dev, "event of unknown type %u: ignored\n", type);
		return;
	}
	if (gid)
		ism_gid_to_uuid(&ev.gid, gid);
	ism_deliver_event(iv, &ev);
}

/* Post event buffer i; call with ev_lock held (or before the queue runs). */
static int ism_post_evbuf(struct ism_vdev *iv, unsigned int i)
{
	struct scatterlist sg;

	sg_init_one(&sg, &iv->evbufs[i], sizeof(iv->evbufs[i]));
	return virtqueue_add_inbuf(iv->evq, &sg, 1, &iv->evbufs[i], GFP_ATOMIC);
}

static void ism_drain_events(struct ism_vdev *iv)
{
	unsigned int used, reposted = 0;
	unsigned long flags;
	void *buf;

	spin_lock_irqsave(&iv->ev_lock, flags);
	while ((buf = virtqueue_get_buf(iv->evq, &used))) {
		ptrdiff_t off = (u8 *)buf - (u8 *)iv->evbufs;
		unsigned int i;

		if (off < 0 || off % sizeof(struct ism_event) ||
		    off / sizeof(struct ism_event) >= iv->nr_evbufs) {
			dev_err_ratelimited(&iv->vdev->dev, "event queue returned a buffer never posted\n");
			continue;
		}
		i = off / sizeof(struct ism_event);
		if (used < sizeof(struct ism_event))
			dev_warn_ratelimited(&iv->vdev->dev, "event of %u bytes: ignored\n", used);
		else
			ism_handle_event(iv, &iv->evbufs[i]);
		if (!ism_post_evbuf(iv, i))
			reposted++;
	}
	if (reposted)
		virtqueue_notify(iv->evq);
	spin_unlock_irqrestore(&iv->ev_lock, flags);
}

static void ism_evq_cb(struct virtqueue *vq)
{
	struct ism_vdev *iv = vq->vdev->priv;

	ism_drain_events(iv);
	ism_look(iv);
}

/* ---- dibs ops ---- */

static u16 ism_get_fabric_id(struct dibs_dev *dibs)
{
	struct ism_vdev *iv = dibs->drv_priv;

	return iv->chid;
}

static int ism_query_rgid(struct dibs_dev *dibs, const uuid_t *rgid,
			  u32 vid_valid, u32 vid)
{
	struct ism_vdev *iv = dibs->drv_priv;
	u64 gid = ism_uuid_to_gid(rgid);

	if (!gid)
		return -ENOENT;	/* gid_ext set: not one of our devices */
	return ism_simple(iv, ISM_OP_QUERY_RGID, 0, 0, 0, 0, 0, gid, 0, NULL);
}

/*
 * max_dmbs has no device argument, and dibs sizes dmb_clientid_arr (and SMC
 * its connection table) by it: answer the ABI's limit, which bounds every
 * device's max_dmbs. register_dmb enforces the device's own.
 */
static int ism_max_dmbs(void)
{
	return ISM_MAX_DMBS;
}

static int ism_take_index(struct ism_vdev *iv, u32 want)
{
	unsigned long flags;
	unsigned long i;

	spin_lock_irqsave(&iv->dmb_lock, flags);
	if (want && want < iv->max_dmbs && !test_bit(want, iv->idx_map))
		i = want;
	else
		i = find_first_zero_bit(iv->idx_map, iv->max_dmbs);
	if (i < iv->max_dmbs)
		__set_bit(i, iv->idx_map);
	spin_unlock_irqrestore(&iv->dmb_lock, flags);
	return i < iv->max_dmbs ? (int)i : -ENOSPC;
}

static void ism_put_index(struct ism_vdev *iv, u32 i)
{
	unsigned long flags;

	spin_lock_irqsave(&iv->dmb_lock, flags);
	iv->own[i].token = 0;
	__clear_bit(i, iv->idx_map);
	spin_unlock_irqrestore(&iv->dmb_lock, flags);
}

/*
 * A new DMB at index i starts from the counters as they are (no MOVE
 * reaches an index without a DMB, so they should not move, but a stale
 * view must not look like a signal).
 */
static void ism_reset_copies(struct ism_vdev *iv, u32 i)
{
	unsigned long flags;
	unsigned int e;

	spin_lock_irqsave(&iv->sig_lock, flags);
	iv->seq_seen[i] = ism_sba32(iv, ISM_SBA_SEQ(i));
	for (e = 0; e < ISM_MAX_DMBES; e++)
		iv->dmbe_seen[i * ISM_MAX_DMBES + e] = ism_sba16(iv, ISM_SBA_DMBE(i, e));
	spin_unlock_irqrestore(&iv->sig_lock, flags);
}

/* Attach mode: a DMB in the shm region; 0 or a negative errno. */
static int ism_register_attached(struct ism_vdev *iv, struct dibs_dmb *dmb,
				 u32 idx, u64 rgid)
{
	struct ism_resp resp;
	u64 off, token;
	int rc;

	rc = ism_simple(iv, ISM_OP_REGISTER_DMB, ISM_FLAG_ATTACH, idx, 0, 0,
			dmb->dmb_len, rgid, 0, &resp);
	if (rc)
		return rc;
	token = le64_to_cpu(resp.value);
	off = (u64)le32_to_cpu(resp.index) * ISM_SHM_PAGE;
	if (!token || off >= iv->shm_len ||
	    iv->shm_len - off < ALIGN((u64)dmb->dmb_len, ISM_SHM_PAGE)) {
		dev_err_ratelimited(&iv->vdev->dev,
				    "REGISTER_DMB (attach) answered token %#llx at %#llx, outside the region\n",
				    token, off);
		if (token)
			ism_simple(iv, ISM_OP_UNREGISTER_DMB, 0, 0, token, 0, 0, 0, 0, NULL);
		return -EPROTO;
	}
	dmb->dmb_tok = token;
	dmb->cpu_addr = iv->shm + off;
	dmb->dma_addr = iv->shm_phys + off;
	return 0;
}

static int ism_register_copy(struct ism_vdev *iv, struct dibs_dmb *dmb,
			     u32 idx, u64 rgid)
{
	size_t size = PAGE_ALIGN(dmb->dmb_len);
	struct ism_resp resp;
	void *mem;
	u64 token;
	int rc;

	/* Contiguous guest-physical memory; zeroed as SMC expects. */
	mem = alloc_pages_exact(size, GFP_KERNEL | __GFP_ZERO | __GFP_NOWARN |
				__GFP_NORETRY);
	if (!mem)
		return -ENOMEM;
	rc = ism_simple(iv, ISM_OP_REGISTER_DMB, 0, idx, 0, 0, dmb->dmb_len,
			rgid, virt_to_phys(mem), &resp);
	if (rc) {
		if (rc != -EIO)
			free_pages_exact(mem, size);
		/* -EIO: the device may still hold the address; leak it. */
		return rc;
	}
	token = le64_to_cpu(resp.value);
	if (!token || le32_to_cpu(resp.index) != idx) {
		dev_err_ratelimited(&iv->vdev->dev,
				    "REGISTER_DMB index %u answered token %#llx, index %u\n",
				    idx, token, le32_to_cpu(resp.index));
		/* Unregister before the memory goes back: the device may write it. */
		if (token && ism_simple(iv, ISM_OP_UNREGISTER_DMB, 0, 0, token, 0, 0, 0, 0, NULL))
			return -EPROTO;	/* leaked rather than written after free */
		free_pages_exact(mem, size);
		return -EPROTO;
	}
	dmb->dmb_tok = token;
	dmb->cpu_addr = mem;
	dmb->dma_addr = virt_to_phys(mem);
	return 0;
}

static int ism_register_dmb(struct dibs_dev *dibs, struct dibs_dmb *dmb,
			    struct dibs_client *client)
{
	struct ism_vdev *iv = dibs->drv_priv;
	u64 rgid = ism_uuid_to_gid(&dmb->rgid);
	bool attached = false;
	unsigned long flags;
	int idx, rc;

	if (!rgid)
		return -EINVAL;
	if (!dmb->dmb_len || dmb->dmb_len > iv->max_dmb_size)
		return -EINVAL;
	idx = ism_take_index(iv, dmb->idx);
	if (idx < 0)
		return idx;
	ism_reset_copies(iv, idx);

	rc = -ENOSPC;
	if (iv->attach) {
		rc = ism_register_attached(iv, dmb, idx, rgid);
		attached = !rc;
	}
	/* No attach mode, or the region (or mapping budget) is full. */
	if (!iv->attach || rc == -ENOSPC)
		rc = ism_register_copy(iv, dmb, idx, rgid);
	if (rc) {
		ism_put_index(iv, idx);
		return rc;
	}

	spin_lock_irqsave(&iv->dmb_lock, flags);
	iv->own[idx].token = dmb->dmb_tok;
	iv->own[idx].rgid = rgid;
	iv->own[idx].cpu_addr = dmb->cpu_addr;
	iv->own[idx].len = dmb->dmb_len;
	iv->own[idx].attached = attached;
	spin_unlock_irqrestore(&iv->dmb_lock, flags);

	dmb->idx = idx;
	spin_lock_irqsave(&dibs->lock, flags);
	dibs->dmb_clientid_arr[idx] = client->id;
	spin_unlock_irqrestore(&dibs->lock, flags);
	return 0;
}

static void ism_free_own(struct ism_vdev *iv, u32 idx)
{
	struct ism_own_dmb *o = &iv->own[idx];

	if (!o->attached && o->cpu_addr)
		free_pages_exact(o->cpu_addr, PAGE_ALIGN(o->len));
	o->cpu_addr = NULL;
	ism_put_index(iv, idx);
}

static int ism_unregister_dmb(struct dibs_dev *dibs, struct dibs_dmb *dmb)
{
	struct ism_vdev *iv = dibs->drv_priv;
	unsigned long flags;
	u32 idx = dmb->idx;
	int rc;

	spin_lock_irqsave(&iv->dmb_lock, flags);
	if (idx >= iv->max_dmbs || !iv->own[idx].token ||
	    iv->own[idx].token != dmb->dmb_tok) {
		spin_unlock_irqrestore(&iv->dmb_lock, flags);
		return -EINVAL;
	}
	spin_unlock_irqrestore(&iv->dmb_lock, flags);

	spin_lock_irqsave(&dibs->lock, flags);
	dibs->dmb_clientid_arr[idx] = NO_DIBS_CLIENT;
	spin_unlock_irqrestore(&dibs->lock, flags);

	rc = ism_simple(iv, ISM_OP_UNREGISTER_DMB, 0, 0, dmb->dmb_tok, 0, 0, 0, 0, NULL);
	/*
	 * NOENTRY: the device revoked it and writes it no more. A dead
	 * backend writes nothing either. Anything else: the device may
	 * still write the memory, so it stays allocated.
	 */
	if (rc == 0 || rc == -ENOENT || (rc == -EIO && iv->dead)) {
		ism_free_own(iv, idx);
		return 0;
	}
	dev_warn_ratelimited(&iv->vdev->dev, "UNREGISTER_DMB %#llx: %d; memory kept\n",
			     dmb->dmb_tok, rc);
	return rc;
}

static int ism_move_data(struct dibs_dev *dibs, u64 dmb_tok, unsigned int idx,
			 bool sf, unsigned int offset, void *data,
			 unsigned int size)
{
	struct ism_vdev *iv = dibs->drv_priv;
	unsigned int piece_max = min_t(u32, iv->max_move_len, ISM_MOVE_PIECE);
	struct ism_resp resp;
	int rc;

	if (idx >= ISM_MAX_DMBES)
		return -EINVAL;
	do {
		unsigned int piece = min(size, piece_max);
		bool last = piece == size;
		struct ism_req_hdr req = {
			.op = cpu_to_le16(ISM_OP_MOVE),
			.flags = cpu_to_le16(last && sf ? ISM_FLAG_SIGNAL : 0),
			.index = cpu_to_le32(idx),
			.token = cpu_to_le64(dmb_tok),
			.offset = cpu_to_le64(offset),
			.len = cpu_to_le64(piece),
		};

		rc = ism_do(iv, &req, data, piece, &resp);
		if (rc)
			return rc;
		data += piece;
		offset += piece;
		size -= piece;
	} while (size);
	return 0;
}

/* The device has no VLANs; SMC-Dv2 needs add_vlan_id(0x1FFF) to succeed. */
static int ism_add_vlan_id(struct dibs_dev *dibs, u64 vlan_id)
{
	return 0;
}

static int ism_del_vlan_id(struct dibs_dev *dibs, u64 vlan_id)
{
	return 0;
}

static int ism_signal_event(struct dibs_dev *dibs, const uuid_t *rgid,
			    u32 trigger_irq, u32 event_code, u64 info)
{
	struct ism_vdev *iv = dibs->drv_priv;
	u64 gid = ism_uuid_to_gid(rgid);

	if (!gid)
		return -ENOENT;
	if (event_code > 0xffff)
		return -EINVAL;
	return ism_simple(iv, ISM_OP_SIGNAL, 0, event_code, 0, info, 0, gid, 0, NULL);
}

static int ism_support_mmapped_rdmb(struct dibs_dev *dibs)
{
	struct ism_vdev *iv = dibs->drv_priv;

	return iv->attach;
}

static int ism_attach_dmb(struct dibs_dev *dibs, struct dibs_dmb *dmb)
{
	struct ism_vdev *iv = dibs->drv_priv;
	struct ism_attachment *a;
	struct ism_resp resp;
	unsigned long flags;
	u64 off, len;
	int rc;

	if (!iv->attach)
		return -EOPNOTSUPP;
	a = kzalloc_obj(*a);
	if (!a)
		return -ENOMEM;
	rc = ism_simple(iv, ISM_OP_ATTACH_DMB, 0, 0, dmb->dmb_tok, 0, 0, 0, 0, &resp);
	if (rc) {
		kfree(a);
		return rc;
	}
	off = le64_to_cpu(resp.value);
	len = le32_to_cpu(resp.index);
	if (!len || len > iv->max_dmb_size || off % ISM_SHM_PAGE ||
	    off >= iv->shm_len || iv->shm_len - off < ALIGN(len, ISM_SHM_PAGE)) {
		dev_err_ratelimited(&iv->vdev->dev,
				    "ATTACH_DMB %#llx answered %llu bytes at %#llx, outside the region\n",
				    dmb->dmb_tok, len, off);
		ism_simple(iv, ISM_OP_DETACH_DMB, 0, 0, dmb->dmb_tok, 0, 0, 0, 0, NULL);
		kfree(a);
		return -EPROTO;
	}
	a->token = dmb->dmb_tok;
	spin_lock_irqsave(&iv->dmb_lock, flags);
	list_add(&a->list, &iv->attachments);
	spin_unlock_irqrestore(&iv->dmb_lock, flags);

	dmb->cpu_addr = iv->shm + off;
	dmb->dma_addr = iv->shm_phys + off;
	dmb->dmb_len = len;
	dmb->idx = 0;	/* the peer's index means nothing here */
	return 0;
}

static int ism_detach_dmb(struct dibs_dev *dibs, u64 token)
{
	struct ism_vdev *iv = dibs->drv_priv;
	struct ism_attachment *a, *found = NULL;
	unsigned long flags;
	int rc;

	spin_lock_irqsave(&iv->dmb_lock, flags);
	list_for_each_entry(a, &iv->attachments, list) {
		if (a->token == token) {
			found = a;
			list_del(&a->list);
			break;
		}
	}
	spin_unlock_irqrestore(&iv->dmb_lock, flags);
	if (!found)
		return -ENOENT;
	kfree(found);
	rc = ism_simple(iv, ISM_OP_DETACH_DMB, 0, 0, token, 0, 0, 0, 0, NULL);
	/* NOENTRY: the owner dropped it, and the mapping is gone already. */
	return rc == -ENOENT ? 0 : rc;
}

static const struct dibs_dev_ops ism_copy_ops = {
	.get_fabric_id = ism_get_fabric_id,
	.query_remote_gid = ism_query_rgid,
	.max_dmbs = ism_max_dmbs,
	.register_dmb = ism_register_dmb,
	.unregister_dmb = ism_unregister_dmb,
	.move_data = ism_move_data,
	.add_vlan_id = ism_add_vlan_id,
	.del_vlan_id = ism_del_vlan_id,
	.signal_event = ism_signal_event,
};

static const struct dibs_dev_ops ism_attach_ops = {
	.get_fabric_id = ism_get_fabric_id,
	.query_remote_gid = ism_query_rgid,
	.max_dmbs = ism_max_dmbs,
	.register_dmb = ism_register_dmb,
	.unregister_dmb = ism_unregister_dmb,
	.move_data = ism_move_data,
	.add_vlan_id = ism_add_vlan_id,
	.del_vlan_id = ism_del_vlan_id,
	.signal_event = ism_signal_event,
	.support_mmapped_rdmb = ism_support_mmapped_rdmb,
	.attach_dmb = ism_attach_dmb,
	.detach_dmb = ism_detach_dmb,
};

/* ---- probe and remove ---- */

static int ism_read_config(struct ism_vdev *iv)
{
	struct virtio_device *vdev = iv->vdev;
	u32 magic;
	u16 version;

	/* Identify first: the virtio id is a setting and may be foreign. */
	magic = virtio_cread32(vdev, ISM_CFG_MAGIC);
	if (magic != ISM_MAGIC) {
		dev_err(&vdev->dev, "config magic %#x, want %#x: not an ISM device, left alone\n",
			magic, ISM_MAGIC);
		return -ENODEV;
	}
	version = virtio_cread16(vdev, ISM_CFG_VERSION);
	if (version != ISM_VERSION) {
		dev_err(&vdev->dev, "device speaks ISM ABI version %u, this driver %u: left alone\n",
			version, ISM_VERSION);
		return -ENODEV;
	}
	iv->modes = virtio_cread16(vdev, ISM_CFG_MODES);
	iv->gid = virtio_cread64(vdev, ISM_CFG_GID);
	iv->chid = virtio_cread16(vdev, ISM_CFG_CHID);
	iv->max_dmbs = virtio_cread32(vdev, ISM_CFG_MAX_DMBS);
	iv->max_dmb_size = virtio_cread32(vdev, ISM_CFG_MAX_DMB_SIZE);
	iv->max_move_len = virtio_cread32(vdev, ISM_CFG_MAX_MOVE_LEN);
	iv->shm_size = virtio_cread64(vdev, ISM_CFG_SHM_SIZE);
	iv->heartbeat_ms = virtio_cread16(vdev, ISM_CFG_HEARTBEAT_MS);

	if (!(iv->modes & (ISM_MODE_COPY | ISM_MODE_ATTACH)) || !iv->gid ||
	    !iv->max_dmbs || !iv->max_dmb_size || !iv->max_move_len) {
		dev_err(&vdev->dev, "device limits make it unusable (modes %#x gid %#llx max_dmbs %u max_dmb_size %u max_move_len %u)\n",
			iv->modes, iv->gid, iv->max_dmbs, iv->max_dmb_size, iv->max_move_len);
		return -ENODEV;
	}
	iv->max_dmbs = min_t(u32, iv->max_dmbs, ISM_MAX_DMBS);
	/* Our DMBs come from the page allocator: 4 MiB is its usual limit. */
	iv->max_dmb_size = min_t(u32, iv->max_dmb_size, PAGE_SIZE << (MAX_PAGE_ORDER));
	return 0;
}

static void ism_setup_attach(struct ism_vdev *iv)
{
	struct virtio_shm_region reg;

	if (!use_attach || !(iv->modes & ISM_MODE_ATTACH) || !iv->shm_size)
		return;
	if (!virtio_get_shm_region(iv->vdev, &reg, 0) || !reg.len) {
		dev_info(&iv->vdev->dev, "attach mode offered but no shared-memory region 0: copy mode\n");
		return;
	}
	iv->shm_len = min_t(u64, reg.len, iv->shm_size);
	iv->shm = memremap(reg.addr, iv->shm_len, MEMREMAP_WB);
	if (!iv->shm) {
		dev_warn(&iv->vdev->dev, "cannot map the shared-memory region: copy mode\n");
		return;
	}
	iv->shm_phys = reg.addr;
	iv->attach = true;
}

static void ism_free(struct ism_vdev *iv)
{
	if (iv->shm)
		memunmap(iv->shm);
	if (iv->sba)
		free_pages_exact(iv->sba, ISM_SBA_SIZE);
	kvfree(iv->seq_seen);
	kvfree(iv->dmbe_seen);
	kfree(iv->evbufs);
	kfree(iv->hdr);
	kfree(iv->resp);
	bitmap_free(iv->idx_map);
	kvfree(iv->own);
	kfree(iv);
}

static int ism_validate(struct virtio_device *vdev)
{
	/*
	 * DMB and SBA addresses go to the device as guest-physical
	 * addresses: no IOMMU translation in between.
	 */
	__virtio_clear_bit(vdev, VIRTIO_F_ACCESS_PLATFORM);
	return 0;
}

static int ism_probe(struct virtio_device *vdev)
{
	struct virtqueue_info vqs_info[] = {
		{ "request", NULL },	/* polled */
		{ "events", ism_evq_cb },
	};
	struct virtqueue *vqs[2];
	struct dibs_dev *dibs;
	struct ism_vdev *iv;
	unsigned int i;
	int rc;

	if (!virtio_has_feature(vdev, VIRTIO_F_VERSION_1))
		return -ENODEV;
	iv = kzalloc_obj(*iv);
	if (!iv)
		return -ENOMEM;
	iv->vdev = vdev;
	spin_lock_init(&iv->req_lock);
	spin_lock_init(&iv->sig_lock);
	spin_lock_init(&iv->ev_lock);
	spin_lock_init(&iv->dmb_lock);
	INIT_LIST_HEAD(&iv->attachments);
	rc = ism_read_config(iv);
	if (rc)
		goto err_free;

	rc = -ENOMEM;
	iv->hdr = kzalloc_obj(*iv->hdr);
	iv->resp = kzalloc_obj(*iv->resp);
	iv->evbufs = kzalloc_objs(*iv->evbufs, ISM_NR_EVBUFS);
	iv->seq_seen = kvcalloc(ISM_MAX_DMBS, sizeof(*iv->seq_seen), GFP_KERNEL);
	iv->dmbe_seen = kvcalloc(ISM_MAX_DMBS * ISM_MAX_DMBES, sizeof(*iv->dmbe_seen), GFP_KERNEL);
	iv->idx_map = bitmap_zalloc(iv->max_dmbs, GFP_KERNEL);
	iv->own = kvcalloc(iv->max_dmbs, sizeof(*iv->own), GFP_KERNEL);
	/* 128 KiB, page-aligned, physically contiguous, zeroed. */
	iv->sba = alloc_pages_exact(ISM_SBA_SIZE, GFP_KERNEL | __GFP_ZERO);
	if (!iv->hdr || !iv->resp || !iv->evbufs || !iv->seq_seen ||
	    !iv->dmbe_seen || !iv->idx_map || !iv->own || !iv->sba)
		goto err_free;
	vdev->priv = iv;

	rc = virtio_find_vqs(vdev, 2, vqs, vqs_info, NULL);
	if (rc)
		goto err_free;
	iv->reqq = vqs[0];
	iv->evq = vqs[1];
	ism_setup_attach(iv);

	virtio_device_ready(vdev);

	iv->nr_evbufs = min_t(unsigned int, ISM_NR_EVBUFS,
			      virtqueue_get_vring_size(iv->evq));
	for (i = 0; i < iv->nr_evbufs; i++) {
		rc = ism_post_evbuf(iv, i);
		if (rc)
			goto err_reset;
	}
	virtqueue_notify(iv->evq);

	/* Interrupts would be dropped by the virtio core: see ism_poll. */
	rc = ism_simple(iv, ISM_OP_SET_SBA, 0, 0, 0, 0, 0, 0, virt_to_phys(iv->sba), NULL);
	if (rc) {
		dev_err(&vdev->dev, "SET_SBA: %d\n", rc);
		goto err_reset;
	}
	iv->sba_set = true;
	if (iv->heartbeat_ms)
		iv->dead_after_ns = max_t(u64, 10ULL * iv->heartbeat_ms * NSEC_PER_MSEC,
					  2ULL * NSEC_PER_SEC);

	dibs = dibs_dev_alloc();
	if (!dibs) {
		rc = -ENOMEM;
		goto err_reset;
	}
	dibs->ops = iv->attach ? &ism_attach_ops : &ism_copy_ops;
	dibs->drv_priv = iv;
	ism_gid_to_uuid(&dibs->gid, iv->gid);
	/* SMC reads PCI ids and the pnetid from the parent: the PCI device. */
	dibs->dev.parent = vdev->dev.parent;
	dev_set_name(&dibs->dev, "ism-%s", dev_name(vdev->dev.parent));

	iv->poll_ns = ISM_POLL_MIN_NS;
	iv->timer_beat = ism_sba32(iv, ISM_SBA_HEARTBEAT);
	iv->timer_beat_ns = ktime_get_ns();
	hrtimer_setup(&iv->poll_timer, ism_poll, CLOCK_MONOTONIC, HRTIMER_MODE_REL);
	/* Set before the clients see the device: signals find it. */
	iv->dibs = dibs;
	hrtimer_start(&iv->poll_timer, ns_to_ktime(iv->poll_ns), HRTIMER_MODE_REL);

	rc = dibs_dev_add(dibs);
	if (rc) {
		hrtimer_cancel(&iv->poll_timer);
		iv->dibs = NULL;
		put_device(&dibs->dev);
		goto err_reset;
	}
	dev_info(&vdev->dev, "ISM gid %#llx chid %#x, %u DMBs up to %u bytes, %s mode, heartbeat %u ms\n",
		 iv->gid, iv->chid, iv->max_dmbs, iv->max_dmb_size,
		 iv->attach ? "attach" : "copy", iv->heartbeat_ms);
	return 0;

err_reset:
	if (!iv->dead)
		virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
err_free:
	vdev->priv = NULL;
	ism_free(iv);
	return rc;
}

static void ism_remove(struct virtio_device *vdev)
{
	struct ism_vdev *iv = vdev->priv;
	struct dibs_dev *dibs = iv->dibs;
	struct ism_attachment *a, *tmp;
	unsigned int i;

	/* SMC terminates its link groups: DMBs unregistered, peers detached. */
	dibs_dev_del(dibs);
	hrtimer_cancel(&iv->poll_timer);

	/*
	 * Detach and unregister whatever is left before the reset: an unmap
	 * that meets a reset crashed QEMU 11.1.3 (device-abi.md).
	 */
	list_for_each_entry_safe(a, tmp, &iv->attachments, list) {
		ism_simple(iv, ISM_OP_DETACH_DMB, 0, 0, a->token, 0, 0, 0, 0, NULL);
		list_del(&a->list);
		kfree(a);
	}
	for (i = 0; i < iv->max_dmbs; i++) {
		if (!iv->own[i].token)
			continue;
		ism_simple(iv, ISM_OP_UNREGISTER_DMB, 0, 0, iv->own[i].token, 0, 0, 0, 0, NULL);
	}
	/*
	 * A device whose backend is gone is left alone: QEMU 11.1.3 cannot
	 * stop it safely, and nothing writes our memory any more.
	 */
	if (!iv->dead)
		virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
	for (i = 0; i < iv->max_dmbs; i++)
		if (iv->own[i].token)
			ism_free_own(iv, i);
	iv->dibs = NULL;
	put_device(&dibs->dev);
	vdev->priv = NULL;
	ism_free(iv);
}

/*
 * Power-off: the virtio core would reset the device. One whose backend is
 * gone is left alone (QEMU 11.1.3 cannot stop such a vhost-user device
 * safely); either way no request follows.
 */
static void ism_shutdown(struct virtio_device *vdev)
{
	struct ism_vdev *iv = vdev->priv;
	unsigned long flags;
	bool dead;

	hrtimer_cancel(&iv->poll_timer);
	spin_lock_irqsave(&iv->req_lock, flags);
	dead = iv->dead;
	iv->dead = true;
	spin_unlock_irqrestore(&iv->req_lock, flags);
	if (!dead)
		virtio_device_shutdown(vdev);
}

static struct virtio_device_id ism_id_table[] = {
	{ 38, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static struct virtio_driver ism_virtio_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = ism_id_table,
	.validate = ism_validate,
	.probe = ism_probe,
	.remove = ism_remove,
	.shutdown = ism_shutdown,
};

static int __init ism_dibs_init(void)
{
	if (!virtio_id || virtio_id > 0xffff) {
		pr_err("ism_dibs: virtio_id %u out of range\n", virtio_id);
		return -EINVAL;
	}
	ism_id_table[0].device = virtio_id;
	return register_virtio_driver(&ism_virtio_driver);
}

static void __exit ism_dibs_exit(void)
{
	unregister_virtio_driver(&ism_virtio_driver);
}

module_init(ism_dibs_init);
module_exit(ism_dibs_exit);

MODULE_DEVICE_TABLE(virtio, ism_id_table);
MODULE_DESCRIPTION("DIBS (SMC-D) driver for ism-backend's ISM virtio device");
MODULE_LICENSE("GPL");
