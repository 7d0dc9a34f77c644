/* iov.h — iovec helpers shared by the rooms that move request data (blk, disk, engine). */
#ifndef DP_IOV_H
#define DP_IOV_H

#include <stddef.h>
#include <sys/uio.h>

/* Copy up to len bytes out of / into an iovec list, starting skip bytes in. */
size_t iov_to_buf(const struct iovec *iov, unsigned cnt, size_t skip, void *buf, size_t len);
size_t iov_from_buf(const struct iovec *iov, unsigned cnt, size_t skip, const void *buf,
                    size_t len);
size_t iov_total(const struct iovec *iov, unsigned cnt);
/* Drop the first n bytes of an iovec list in place. */
void iov_advance(struct iovec **iov, unsigned *cnt, size_t n);

#endif
