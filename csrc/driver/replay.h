/* replay.h — the trace replayer's per-queue state (replay.c). One thread takes records from
 * its feed in order and issues them through a transport: the driver side of a virtqueue,
 * split (driver.h) or packed (packed_driver.h), or an io_uring on a file. Scheduling, ordering and statistics are
 * transport-independent, so a replay through a backend and the bare-metal baseline differ
 * only in where requests go. */
#ifndef DP_REPLAY_H
#define DP_REPLAY_H

#include <liburing.h>
#include <pthread.h>
#include <stdint.h>

#include "driver/dp_replay.h"
#include "driver.h"
#include "util/hist.h"

/* One request slot: a data buffer and (vring) the request's header, status, discard range
 * and indirect table, reused for every record the slot carries. */
struct replay_slot {
    uint64_t offset;
    uint64_t t_sched;            /* due (timed) or issuable (afap) */
    uint64_t t_submit;
    uint64_t seq;                /* the record's position in the queue's feed */
    uint32_t length;
    uint8_t op;
    uint8_t inflight;
    uint8_t layout;              /* vring: the op its descriptors are laid out for */
    uint8_t ring_descs;          /* packed: ring slots its list takes (1 when indirect) */
    uint16_t head;               /* vring: head descriptor of its chain (packed: its buffer id) */
    uint16_t list_pos;           /* where it sits in the in-flight list */
    uint8_t *data;               /* host address of the data buffer */
    uint64_t data_gpa;           /* vring: guest address of the same */
    uint8_t *meta;               /* vring: header (16), status (1), range (16 at 32), table (48 at 64) */
    uint64_t meta_gpa;
    union {                      /* vring: the data descriptor, once laid out */
        struct vring_desc *data_desc;
        struct pvirtq_desc *pdata_desc;   /* packed: in its table or its template */
    };
};

/* Single producer (dp_replay_feed, a Python thread), single consumer (the replay thread).
 * head and tail count records ever taken / added; the slot is index & mask. */
struct replay_feed {
    struct dp_replay_rec *buf;
    uint32_t mask;
    uint64_t local_head;         /* consumer's private copy, ahead of head within a batch */
    uint64_t local_tail;         /* consumer's last look at tail */
    uint64_t head;               /* consumer's, published in chunks (feed_release) */
    char pad[64];                /* the producer's stores to tail stay off the consumer's line */
    uint64_t tail;               /* producer's */
    int end;                     /* no more records will come */
    int consumer_waiting;        /* the thread sleeps on wake_fd for records */
    int producer_waiting;        /* dp_replay_feed sleeps on `room` */
    pthread_cond_t room;
};

/* A published second. */
struct replay_series_entry {
    struct dp_replay_second row;
    struct dp_hist hist[DP_REPLAY_SERIES_HISTS];
};

/* The cumulative stats at the end of the last published second. */
struct replay_series_snap {
    uint64_t completed;
    uint64_t ios[DP_REPLAY_OPS];
    uint64_t bytes[DP_REPLAY_OPS];
    struct dp_hist clat[2];      /* read, write */
    struct dp_hist slat[DP_REPLAY_OPS];
};

#define REPLAY_SERIES_RING 16
/* In-flight requests whose range covers a bucket (hashed), and of those the writes and trims. */
struct hazard_bucket {
    uint16_t any;
    uint16_t write;
};

struct dp_replay {
    struct dp_replay_params p;
    /* transports */
    struct driver_ring ring;     /* DP_REPLAY_VRING */
    int packed;                  /* ... on a packed ring: */
    struct driver_packed pring;
    struct pvirtq_desc *ptmpl;   /* each slot's ring descriptors (3 per slot, id = the slot) */
    uint16_t *head_to_slot;
    struct io_uring uring;       /* DP_REPLAY_URING */
    int uring_ready;
    int fixed_buffers;           /* buffers registered: READ_FIXED / WRITE_FIXED */
    uint8_t *own_bufs;
    unsigned abandoned;          /* requests still in flight when the thread ended */
    /* slots */
    struct replay_slot *slots;
    uint16_t *free_slots;        /* stack of free slot numbers */
    unsigned nfree;
    uint16_t *inflight_list;     /* slots in flight, for the overlap check */
    unsigned inflight;
    unsigned writes_inflight;    /* of those, writes and trims */
    struct hazard_bucket *hazard_map;   /* 1 << hazard_bits entries (replay.c: hazard_track) */
    unsigned hazard_bits;
    unsigned hazard_shift;       /* a bucket is 1 << hazard_shift bytes of the target */
    unsigned hazard_big;         /* in flight, too long to bucket */
    uint16_t *batch;             /* slots added since the last publish */
    unsigned nbatch;
    /* feed and schedule */
    struct replay_feed feed;
    uint64_t seq;                /* records taken so far */
    uint64_t noted_hazard;       /* seq + 1 of the record last counted in hazard_waits */
    uint64_t noted_full;         /* ... in full_waits */
    int starved;                 /* counted in feed_waits, no record taken since */
    uint64_t spin_win_ns;        /* the completion spin now, within [0, p.poll_ns] (spin_adapt) */
    unsigned spin_skipped;       /* waits without a spin since the window closed */
    uint64_t start_ns;
    int begun;
    uint64_t last_completion;
    /* results */
    struct dp_load_dir_stats op[DP_REPLAY_OPS];
    struct dp_replay_counters c;
    uint64_t completed;          /* read by dp_replay_completed while running */
    /* per-second rows, published into series[] for Python to take */
    struct replay_series_snap prev;
    uint64_t cur_second;
    uint64_t cur_end_ns;
    struct replay_series_entry *series;
    uint64_t series_head;        /* taken by Python */
    uint64_t series_tail;        /* published by the thread */
    uint64_t horizon;

    /* its lock also guards begin and the feed's waits; stop, begin and feed arrivals wake it */
    struct driver_thread t;
};

#endif
