/*
 * A small printf for pykvm guests (32- and 64-bit; no libgcc needed: 64-bit
 * decimal conversion in 32-bit code divides in 16-bit steps).
 */
#include "rt.h"

struct sink {
    void (*emit)(struct sink *s, char c);
    char *buf;         /* vsnprintf: destination */
    size_t size, pos;  /* vsnprintf: capacity, characters produced */
    char line[64];     /* printf: staging buffer flushed to the serial port */
    size_t fill;
};

/* Divide *v by 10 in place and return the remainder. */
static unsigned divmod10(uint64_t *v)
{
#ifdef __x86_64__
    unsigned r = (unsigned)(*v % 10);
    *v /= 10;
    return r;
#else
    uint32_t hi = (uint32_t)(*v >> 32), lo = (uint32_t)*v;
    uint32_t qhi = hi / 10, r = hi % 10;
    uint32_t t = (r << 16) | (lo >> 16);
    uint32_t q1 = t / 10;
    r = t % 10;
    t = (r << 16) | (lo & 0xffff);
    uint32_t q0 = t / 10;
    r = t % 10;
    *v = ((uint64_t)qhi << 32) | (q1 << 16) | q0;
    return r;
#endif
}

static void pad(struct sink *s, char c, int n)
{
    while (n-- > 0)
        s->emit(s, c);
}

static void emit_str(struct sink *s, const char *str, int len, int width, int left)
{
    if (!left)
        pad(s, ' ', width - len);
    for (int i = 0; i < len; i++)
        s->emit(s, str[i]);
    if (left)
        pad(s, ' ', width - len);
}

static void emit_num(struct sink *s, uint64_t v, int neg, unsigned base, int upper,
                     int width, int zero, int left, const char *prefix)
{
    char tmp[24];
    int n = 0;
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";

    if (base == 16) {
        do {
            tmp[n++] = digits[v & 15];
            v >>= 4;
        } while (v);
    } else {
        do
            tmp[n++] = digits[divmod10(&v)];
        while (v);
    }
    int plen = (int)strlen(prefix) + (neg ? 1 : 0);
    int fill = width - n - plen;
    if (!left && !zero)
        pad(s, ' ', fill);
    if (neg)
        s->emit(s, '-');
    for (const char *p = prefix; *p; p++)
        s->emit(s, *p);
    if (!left && zero)
        pad(s, '0', fill);
    while (n)
        s->emit(s, tmp[--n]);
    if (left)
        pad(s, ' ', fill);
}

static void format(struct sink *s, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            s->emit(s, *fmt);
            continue;
        }
        fmt++;
        int left = 0, zero = 0, alt = 0, width = 0, prec = -1, lng = 0;
        for (;; fmt++) {
            if (*fmt == '-')
                left = 1;
            else if (*fmt == '#')
                alt = 1;
            else if (*fmt == '0')
                zero = 1;
            else
                break;
        }
        if (*fmt == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                left = 1;
                width = -width;
            }
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
        }
        if (*fmt == '.') {
            fmt++;
            prec = 0;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    prec = prec * 10 + (*fmt++ - '0');
            }
        }
        for (;; fmt++) {
            if (*fmt == 'l')
                lng++;
            else if (*fmt == 'z')
                lng = sizeof(size_t) == 8 ? 2 : 0;
            else if (*fmt != 'h')
                break;
        }

        uint64_t u;
        int64_t d;
        switch (*fmt) {
        case 'd':
        case 'i':
            d = lng >= 2 ? va_arg(ap, long long) : lng ? va_arg(ap, long) : va_arg(ap, int);
            emit_num(s, d < 0 ? -(uint64_t)d : (uint64_t)d, d < 0, 10, 0, width, zero, left, "");
            break;
        case 'u':
        case 'x':
        case 'X':
            u = lng >= 2 ? va_arg(ap, unsigned long long)
                : lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
            emit_num(s, u, 0, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, zero, left,
                     alt && *fmt != 'u' && u ? (*fmt == 'X' ? "0X" : "0x") : "");
            break;
        case 'p':
            u = (uintptr_t)va_arg(ap, void *);
            emit_num(s, u, 0, 16, 0, width, zero, left, "0x");
            break;
        case 'c': {
            char c = (char)va_arg(ap, int);
            emit_str(s, &c, 1, width, left);
            break;
        }
        case 's': {
            const char *str = va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            int len = prec >= 0 ? (int)strnlen(str, (size_t)prec) : (int)strlen(str);
            emit_str(s, str, len, width, left);
            break;
        }
        case '%':
            s->emit(s, '%');
            break;
        case '\0':
            return;
        default: /* unknown conversion: print it verbatim */
            s->emit(s, '%');
            s->emit(s, *fmt);
            break;
        }
    }
}

static void emit_buf(struct sink *s, char c)
{
    if (s->pos + 1 < s->size)
        s->buf[s->pos] = c;
    s->pos++;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct sink s = { .emit = emit_buf, .buf = buf, .size = size };
    format(&s, fmt, ap);
    if (size)
        buf[s.pos < size ? s.pos : size - 1] = '\0';
    return (int)s.pos;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

static void flush_serial(struct sink *s)
{
    serial_write(s->line, s->fill);
    s->fill = 0;
}

static void emit_serial(struct sink *s, char c)
{
    s->line[s->fill++] = c;
    s->pos++;
    if (s->fill == sizeof(s->line))
        flush_serial(s);
}

int vprintf(const char *fmt, va_list ap)
{
    struct sink s = { .emit = emit_serial };
    format(&s, fmt, ap);
    flush_serial(&s);
    return (int)s.pos;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}
