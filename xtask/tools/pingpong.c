// A pipe ping-pong between two processes or two threads, pinned to CPU 0 (the peer to the
// CPU given): the cost of a round trip of wake-ups, with and without a switch of address space.
// Build: gcc -O2 -static -pthread -o pingpong xtask/tools/pingpong.c
// Run in the guest: cargo xtask vm-shell --with ./pingpong, then `pingpong proc|thread PEER_CPU N`.
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static int a[2], b[2];
static int n = 20000, cpu_peer = 0;
static void pin(int c){cpu_set_t s;CPU_ZERO(&s);CPU_SET(c,&s);sched_setaffinity(0,sizeof s,&s);}
static void *peer(void *x){char c;pin(cpu_peer);for(int i=0;i<n;i++){if(read(a[0],&c,1)!=1)break;write(b[1],&c,1);}return 0;}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int argc,char**argv){
  const char*mode=argc>1?argv[1]:"proc"; cpu_peer=argc>2?atoi(argv[2]):0; if(argc>3)n=atoi(argv[3]);
  pipe(a);pipe(b);pin(0);pthread_t th;pid_t pid=0;
  if(!strcmp(mode,"thread"))pthread_create(&th,0,peer,0);
  else if((pid=fork())==0){peer(0);_exit(0);}
  char c='x';double t0=now();
  for(int i=0;i<n;i++){write(a[1],&c,1);read(b[0],&c,1);}
  double t=now()-t0;
  printf("%s peer-cpu %d: %.1f us per round trip (%d)\n",mode,cpu_peer,t/n*1e6,n);
  if(pid)waitpid(pid,0,0);else pthread_join(th,0);return 0;}
