import org.apache.kafka.connect.cli.ConnectStandalone;

/**
 * Runs a Kafka Connect standalone worker (arguments as for ConnectStandalone: the worker's
 * properties, then the connector's) for as long as standard input stays open.
 *
 * <p>Why a launcher: the benchmark holds the worker's stdin. When the benchmark ends, normally or
 * by a crash or a kill, the pipe closes and the worker exits through its shutdown hook (the
 * connector stops and its replication connection closes), so no JVM outlives the run and the
 * benchmark's cleanup can drop the replication slot. No shell or signal handling needed.
 */
public final class Launch {
    private Launch() {}

    public static void main(String[] args) throws Exception {
        Thread watch = new Thread(() -> {
            try {
                while (System.in.read() != -1) {
                    // The benchmark never writes; anything it did would be ignored.
                }
            } catch (java.io.IOException e) {
                // A broken pipe means the same as end of input.
            }
            System.exit(0);
        }, "stdin-watch");
        watch.setDaemon(true);
        watch.start();
        ConnectStandalone.main(args);
    }
}
