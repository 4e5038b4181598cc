// The Pub/Sub emulator's jar (cloud-pubsub-emulator 0.8.20, Google Cloud CLI) bundles a
// grpc-core whose ServerImpl calls InternalStatus.asRuntimeException(Status, Metadata,
// boolean), which its bundled grpc-api lacks. The NoSuchMethodError it throws when a client
// stream closes keeps the emulator from ever hearing that the stream is gone: it goes on
// delivering to the dead stream, and each message comes back only after its ack deadline,
// again and again. tests/emulators.sh puts this class ahead of the jar. It is the bundled
// class (same fields and method) plus the missing method.
package io.grpc;

public final class InternalStatus {
    private InternalStatus() {}

    public static final Metadata.Key<String> MESSAGE_KEY = Status.MESSAGE_KEY;

    public static final Metadata.Key<Status> CODE_KEY = Status.CODE_KEY;

    public static StatusRuntimeException asRuntimeExceptionWithoutStacktrace(
            Status status, Metadata trailers) {
        return new InternalStatusRuntimeException(status, trailers);
    }

    public static StatusRuntimeException asRuntimeException(
            Status status, Metadata trailers, boolean fillInStackTrace) {
        return fillInStackTrace
                ? new StatusRuntimeException(status, trailers)
                : new InternalStatusRuntimeException(status, trailers);
    }
}
