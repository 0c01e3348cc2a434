/*
 * The proxy's two message walks, shared by _speedups.c (the Python-callable scanners) and
 * broker/_proxyclient.c and _proxybackend.c (the proxy session's read callbacks). The references
 * are pgreuse.wire.scan.scan_server_py and scan_client_py: these must do exactly what they do.
 */
#ifndef PGREUSE_SCAN_H
#define PGREUSE_SCAN_H

#include <stdint.h>

/* Flags in scan_server's result (keep in step with pgreuse.wire.scan). */
#define SAW_PARAMETER_STATUS 1
#define BAD_LENGTH 2
#define UNSOLICITED_READY 4

/* Keep in step with pgreuse.wire.protocol.MAX_FRAME. */
#define MAX_FRAME (64 * 1024 * 1024)

static inline int32_t
pgr_length(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[1] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 8) |
                     (uint32_t)p[4]);
}

/* scan_server_py over buf[0:len] from *pos with *syncs unanswered; updates both, returns flags and
 * sets *tx to the last ReadyForQuery status (-1 if none). Positions are 64-bit everywhere:
 * pos + 1 + length must not overflow. */
static inline long
pgr_scan_server(const unsigned char *buf, long long len, long long *pos, long *syncs, long *tx)
{
    long flags = 0;
    long long p_ = *pos;
    long s = *syncs;
    /* From here on a header plus ReadyForQuery's status byte no longer fit. */
    long long last = len - 6;

    *tx = -1;
    while (p_ <= last) {
        const unsigned char *p = buf + p_;
        unsigned char type = p[0];
        int32_t length = pgr_length(p);

        if (type == 'Z') {
            *tx = p[5];
            if (--s < 0) {
                flags |= UNSOLICITED_READY;
                break;
            }
        }
        else if (type == 'S') {
            flags |= SAW_PARAMETER_STATUS;
        }
        if (length < 4) {
            flags |= BAD_LENGTH;
            break;
        }
        p_ += 1 + (long long)length;
    }
    *pos = p_;
    *syncs = s;
    return flags;
}

/* scan_client_py over buf[0:n]: 0 and *first = the first type byte for the fast path, -1 (and
 * *first = -1) when the proxy's message loop must take the bytes. */
static inline int
pgr_scan_client(const unsigned char *buf, long long n, int session_mode, long *syncs,
                long *unsynced, long *first)
{
    long long pos = 0;
    long s = 0;
    long u = -1;

    *syncs = 0;
    *unsynced = 0;
    *first = -1;
    if (n < 5)
        return -1;
    while (pos < n) {
        const unsigned char *p = buf + pos;
        unsigned char type;
        int32_t length;
        long long end;

        if (n - pos < 5)
            return -1;
        type = p[0];
        length = pgr_length(p);
        end = pos + 1 + (long long)length;
        if (length < 4 || length > MAX_FRAME || end > n || type == 'X')
            return -1;
        if (type == 'Q' || type == 'S' || type == 'F') {
            s++;
            u = 0;
        }
        else if (type != 'd' && type != 'c' && type != 'f' && type != 'H') {
            if (type == 'P' && !session_mode && length > 4 && p[5] != 0)
                return -1;
            u = 1;
        }
        pos = end;
    }
    *syncs = s;
    *unsynced = u;
    *first = buf[0];
    return 0;
}

/* scan.NEUTRAL: COPY data, CopyDone, CopyFail, Flush. */
static inline int
pgr_neutral(long type)
{
    return type == 'd' || type == 'c' || type == 'f' || type == 'H';
}

#endif
