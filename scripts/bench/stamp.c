/* stamp FD: write the CLOCK_MONOTONIC time to FD (built -static so the time
 * is taken a few microseconds after the exec, with no dynamic loader). */
#include "common.h"

int main(int argc, char **argv)
{
	int64_t t = mono_ns();
	if (argc > 1 && write(atoi(argv[1]), &t, sizeof(t)) != sizeof(t))
		return 1;
	return 0;
}
