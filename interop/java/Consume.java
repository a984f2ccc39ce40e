// Reads trialflow's output topics and decodes every message with Apache Avro's
// BinaryMessageDecoder, as a team outside trialflow would (schemas/INTEROP.md, "Reading the output
// topics"): the writer schema is found by the message's fingerprint among the .avsc files (current
// and released), the datum resolved into the current schema of that event.
//
//   java -cp '.tools/interop/java/libs/*' interop/java/Consume.java \
//       --topics epro.responses.v1,monitoring.alerts.v1 --expect 10
//
// Reads every partition from its beginning (assign, no consumer group: nothing is committed) and
// prints one JSON line per message: topic, partition, offset, key, headers, fingerprint, event and
// the decoded value (GenericData's JSON: uuids as text, instants as microseconds). A message it
// cannot decode is printed with an "error" instead. Stops after --expect messages (exit 0) or
// after --timeout seconds (exit 1).

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.stream.Collectors;
import java.util.stream.Stream;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class Consume {
  public static void main(String[] argv) throws Exception {
    System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", System.getProperty("interop.log", "warn"));
    System.setProperty("org.slf4j.simpleLogger.logFile", "System.err");
    Map<String, String> args = new LinkedHashMap<>();
    for (int i = 0; i + 1 < argv.length; i += 2) {
      args.put(argv[i], argv[i + 1]);
    }
    if (!args.containsKey("--topics") || !args.containsKey("--expect")) {
      System.err.println("usage: Consume.java --topics T[,T] --expect N [--timeout S] [--bootstrap-servers H:P]");
      System.exit(2);
    }
    Path root = Path.of(args.getOrDefault("--root", ".")).toAbsolutePath().normalize();
    int expect = Integer.parseInt(args.get("--expect"));
    long timeoutMs = (long) (Double.parseDouble(args.getOrDefault("--timeout", "60")) * 1000);
    Decoders decoders = new Decoders(root);

    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, args.getOrDefault("--bootstrap-servers", "127.0.0.1:19092"));
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    // INTEROP.md, reading the output topics: committed records only.
    props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
    ObjectMapper json = new ObjectMapper();
    int seen = 0;
    try (KafkaConsumer<byte[], byte[]> consumer =
        new KafkaConsumer<>(props, new ByteArrayDeserializer(), new ByteArrayDeserializer())) {
      List<TopicPartition> partitions = new ArrayList<>();
      for (String topic : args.get("--topics").split(",")) {
        List<PartitionInfo> infos = consumer.partitionsFor(topic, Duration.ofSeconds(10));
        if (infos == null || infos.isEmpty()) {
          throw new IllegalStateException("no partitions for topic " + topic);
        }
        for (PartitionInfo p : infos) {
          partitions.add(new TopicPartition(topic, p.partition()));
        }
      }
      consumer.assign(partitions);
      consumer.seekToBeginning(partitions);
      long deadline = System.currentTimeMillis() + timeoutMs;
      while (seen < expect && System.currentTimeMillis() < deadline) {
        for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(500))) {
          ObjectNode line = json.createObjectNode();
          line.put("topic", r.topic()).put("partition", r.partition()).put("offset", r.offset());
          line.put("key", r.key() == null ? null : new String(r.key(), StandardCharsets.UTF_8));
          ObjectNode headers = line.putObject("headers");
          for (Header h : r.headers()) {
            if (h.value() != null) {
              headers.put(h.key(), new String(h.value(), StandardCharsets.UTF_8));
            }
          }
          try {
            Decoded d = decoders.decode(r.value());
            line.put("event", d.name).put("fingerprint", d.fingerprint);
            line.set("value", json.readTree(GenericData.get().toString(d.record)));
          } catch (Exception e) {
            line.put("error", String.valueOf(e.getMessage()));
          }
          System.out.println(json.writeValueAsString(line));
          seen++;
        }
      }
    }
    if (seen < expect) {
      System.err.printf("read %d of %d messages within %d ms%n", seen, expect, timeoutMs);
      System.exit(1);
    }
  }

  record Decoded(String name, String fingerprint, GenericRecord record) {}

  /** One BinaryMessageDecoder per event, reading into its current schema, knowing every writer schema of it. */
  static final class Decoders {
    final Map<Long, String> namesByFingerprint = new HashMap<>();
    final Map<String, BinaryMessageDecoder<GenericRecord>> byName = new HashMap<>();
    /** Legacy fingerprint -> the specification's fingerprint of the same schema. */
    final Map<Long, Long> legacy = new HashMap<>();

    Decoders(Path root) throws IOException {
      Map<String, Schema> current = new HashMap<>();
      for (Path p : avsc(root.resolve("schemas/avro"))) {
        Schema s = new Schema.Parser().parse(p.toFile());
        current.put(s.getFullName(), s);
      }
      List<Schema> writers = new ArrayList<>(current.values());
      for (Path p : avsc(root.resolve("schemas/released"))) {
        writers.add(new Schema.Parser().parse(p.toFile()));
      }
      // Records trialflow wrote before its fingerprints followed the specification carry the
      // legacy fingerprint of the same schema (test-vectors: legacy_fingerprint_le_bytes_hex).
      // BinaryMessageDecoder knows a schema only by its own fingerprint (a SchemaStore's answer
      // is registered under that too), so such a header is rewritten to it before decoding.
      JsonNode vectors = new ObjectMapper().readTree(root.resolve("schemas/test-vectors/single-object.json").toFile());
      vectors.get("fingerprints").properties().forEach(e -> {
        JsonNode hex = e.getValue().get("legacy_fingerprint_le_bytes_hex");
        Schema schema = current.get("org.trialflow.events." + e.getKey());
        if (hex != null && schema != null) {
          long fp = ByteBuffer.wrap(HexFormat.of().parseHex(hex.asText())).order(ByteOrder.LITTLE_ENDIAN).getLong();
          legacy.put(fp, SchemaNormalization.parsingFingerprint64(schema));
          namesByFingerprint.putIfAbsent(fp, schema.getFullName());
        }
      });
      for (Schema writer : writers) {
        Schema reader = current.getOrDefault(writer.getFullName(), writer);
        BinaryMessageDecoder<GenericRecord> decoder =
            byName.computeIfAbsent(writer.getFullName(), n -> new BinaryMessageDecoder<>(GenericData.get(), reader));
        // Registers the writer under its fingerprint, SchemaNormalization.parsingFingerprint64.
        decoder.addSchema(writer);
        namesByFingerprint.put(SchemaNormalization.parsingFingerprint64(writer), writer.getFullName());
      }
    }

    static List<Path> avsc(Path dir) throws IOException {
      try (Stream<Path> files = Files.walk(dir)) {
        // common/ holds the shared types, which every event file embeds.
        return files
            .filter(p -> p.toString().endsWith(".avsc") && !p.getParent().getFileName().toString().equals("common"))
            .sorted()
            .collect(Collectors.toList());
      }
    }

    Decoded decode(byte[] payload) throws IOException {
      if (payload == null || payload.length < 10 || (payload[0] & 0xff) != 0xc3 || payload[1] != 0x01) {
        throw new IOException("not Avro single-object encoded (no C3 01 marker)");
      }
      long fp = ByteBuffer.wrap(payload, 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
      String hex = String.format("%016x", Long.reverseBytes(fp));
      String name = namesByFingerprint.get(fp);
      if (name == null) {
        throw new IOException("unknown schema fingerprint " + hex);
      }
      Long spec = legacy.get(fp);
      if (spec != null) {
        payload = payload.clone();
        ByteBuffer.wrap(payload, 2, 8).order(ByteOrder.LITTLE_ENDIAN).putLong(spec);
      }
      GenericRecord record = byName.get(name).decode(payload);
      return new Decoded(name.substring(name.lastIndexOf('.') + 1), hex, record);
    }
  }
}
