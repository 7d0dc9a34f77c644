/* iov.h — iovec helpers shared by the rooms that move request data (blk, disk, engine): copy
 * between an iovec list and a flat buffer, trim a list in place. Inline: the header copy of
 * every request's parse goes through them. */
#ifndef DP_IOV_H
#define DP_IOV_H

#include <stddef.h>
#include <string.h>
#include <sys/uio.h>

static inline size_t iov_total(const struct iovec *iov, unsigned cnt)
{
    size_t n = 0;
    for (unsigned i = 0; i < cnt; i++)
        n += iov[i].iov_len;
    return n;
}

/* Copy between an iovec list (from byte skip on) and a flat buffer, in either direction. */
static inline size_t iov_copy(const struct iovec *iov, unsigned cnt, size_t skip, char *buf, size_t len,
                       int to_iov)
{
    size_t done = 0;
    for (unsigned i = 0; i < cnt && done < len; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        size_t n = iov[i].iov_len - skip;
        if (n > len - done)
            n = len - done;
        char *base = (char *)iov[i].iov_base + skip;
        if (to_iov)
            memcpy(base, buf + done, n);
        else
            memcpy(buf + done, base, n);
        done += n;
        skip = 0;
    }
    return done;
}

static inline size_t iov_to_buf(const struct iovec *iov, unsigned cnt, size_t skip, void *buf, size_t len)
{
    return iov_copy(iov, cnt, skip, buf, len, 0);
}

static inline size_t iov_from_buf(const struct iovec *iov, unsigned cnt, size_t skip, const void *buf,
                    size_t len)
{
    return iov_copy(iov, cnt, skip, (char *)buf, len, 1);
}

static inline void iov_advance(struct iovec **iov, unsigned *cnt, size_t n)
{
    while (*cnt && n >= (*iov)->iov_len) {
        n -= (*iov)->iov_len;
        (*iov)++;
        (*cnt)--;
    }
    if (*cnt && n) {
        (*iov)->iov_base = (char *)(*iov)->iov_base + n;
        (*iov)->iov_len -= n;
    }
}

#endif
