/* Entry point of the build-like workload (linked against every unit). */
#include <stdio.h>

int main(void)
{
	puts("built");
	return 0;
}
