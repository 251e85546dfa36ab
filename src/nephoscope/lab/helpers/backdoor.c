/* Lab helper: a locally compiled program that belongs to no package. Listens on a TCP port and
 * answers every connection with a banner, like a minimal backdoor. */
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 4444;
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, 4) < 0) return 1;
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        const char *banner = "nephoscope-lab-backdoor\n";
        (void)!write(c, banner, strlen(banner));
        close(c);
    }
}
