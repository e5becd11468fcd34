/* One compilation unit of the build-like workload; the Makefile compiles it
 * N times with a different UNIT so each object is distinct. */
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#ifndef UNIT
#define UNIT 0
#endif
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

struct item {
	uint64_t key;
	double weight;
	char name[32];
};

static int cmp_items(const void *a, const void *b)
{
	const struct item *x = a, *y = b;
	return (x->key > y->key) - (x->key < y->key);
}

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	return x ^ (x >> 33);
}

double CAT(unit_score_, UNIT)(struct item *items, size_t n)
{
	double s = 0;
	for (size_t i = 0; i < n; i++) {
		items[i].key = mix(i * 31 + UNIT);
		items[i].weight = (double)(items[i].key % 1000) / 7.0;
		snprintf(items[i].name, sizeof(items[i].name), "u%d-%zu", UNIT, i);
	}
	qsort(items, n, sizeof(*items), cmp_items);
	for (size_t i = 0; i < n; i++)
		s += items[i].weight * (double)strlen(items[i].name);
	return s;
}

int CAT(unit_check_, UNIT)(const char *s)
{
	int h = 0;
	for (; *s; s++) {
		switch (*s % 8) {
		case 0: h += 3; break;
		case 1: h ^= 0x55; break;
		case 2: h *= 5; break;
		case 3: h -= 7; break;
		case 4: h = (h << 1) | (h >> 31); break;
		case 5: h += *s; break;
		case 6: h ^= *s << 3; break;
		default: h = ~h; break;
		}
	}
	return h;
}
