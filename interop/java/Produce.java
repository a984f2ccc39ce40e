// Publishes the example input events of interop/examples to trialflow's input topics, as an EDC
// integration or a patient app outside trialflow would (schemas/INTEROP.md): Avro single-object
// encoded with Apache Avro's BinaryMessageEncoder, keyed by the subject id with the Kafka client's
// default partitioner (murmur2 of the key), with the documented headers.
//
//   java -cp '.tools/interop/java/libs/*' interop/java/Produce.java --bootstrap-servers 127.0.0.1:19092
//
// Prints one JSON line per acknowledged message (event, topic, key, partition, offset, event_id,
// submission_id); exits 1 if any message was not acknowledged. Options for tests: --subject S,
// --new-ids, --only E[,E], --topic-prefix P, --print-hex (as interop/python/produce.py).

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HexFormat;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.Future;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class Produce {
  static final String CONTENT_TYPE = "application/vnd.apache.avro+single-object";

  // The input topics and the schema file of each event; every input topic is keyed by subject id.
  static final Map<String, String[]> INPUTS = new LinkedHashMap<>();

  static {
    INPUTS.put("VitalSignRecorded", new String[] {"clinical.observations.v1", "clinical"});
    INPUTS.put("AdverseEventReported", new String[] {"safety.adverse-events.v1", "safety"});
    INPUTS.put("QuestionnaireResponseSubmitted", new String[] {"epro.submissions.v1", "epro"});
  }

  public static void main(String[] argv) throws Exception {
    System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", System.getProperty("interop.log", "warn"));
    System.setProperty("org.slf4j.simpleLogger.logFile", "System.err");
    Map<String, String> args = parseArgs(argv);
    Path root = Path.of(args.getOrDefault("--root", ".")).toAbsolutePath().normalize();
    String prefix = args.getOrDefault("--topic-prefix", "");
    List<String> names =
        args.containsKey("--only")
            ? Arrays.asList(args.get("--only").split(","))
            : new ArrayList<>(INPUTS.keySet());

    ObjectMapper json = new ObjectMapper();
    List<ProducerRecord<String, byte[]>> records = new ArrayList<>();
    List<ObjectNode> lines = new ArrayList<>();
    for (String name : names) {
      String[] input = INPUTS.get(name);
      if (input == null) {
        throw new IllegalArgumentException("not an input event: " + name);
      }
      Schema schema =
          new Schema.Parser().parse(root.resolve("schemas/avro/" + input[1] + "/" + name + ".avsc").toFile());
      ObjectNode event = (ObjectNode) json.readTree(root.resolve("interop/examples/" + name + ".json").toFile());
      ObjectNode envelope = (ObjectNode) event.get("envelope");
      if (args.containsKey("--subject")) {
        envelope.put("subject_id", args.get("--subject"));
      }
      if (args.containsKey("--new-ids")) {
        envelope.put("event_id", UUID.randomUUID().toString());
        if (event.has("submission_id")) {
          event.put("submission_id", UUID.randomUUID().toString());
        }
      }
      GenericRecord record = (GenericRecord) fromJson(schema, event, name);
      // C3 01, the schema's CRC-64-AVRO fingerprint (SchemaNormalization), the binary datum.
      ByteBuffer encoded = new BinaryMessageEncoder<GenericRecord>(GenericData.get(), schema).encode(record);
      byte[] value = new byte[encoded.remaining()];
      encoded.get(value);
      if (args.containsKey("--print-hex")) {
        ObjectNode line = json.createObjectNode().put("event", name).put("hex", HexFormat.of().formatHex(value));
        System.out.println(json.writeValueAsString(line));
        continue;
      }

      String topic = prefix + input[0];
      String key = envelope.get("subject_id").asText();
      String eventId = envelope.get("event_id").asText();
      ProducerRecord<String, byte[]> out = new ProducerRecord<>(topic, key, value);
      out.headers().add("content-type", CONTENT_TYPE.getBytes(StandardCharsets.UTF_8));
      out.headers().add("event_type", name.getBytes(StandardCharsets.UTF_8));
      out.headers().add("event_id", eventId.getBytes(StandardCharsets.UTF_8));
      records.add(out);

      ObjectNode line = json.createObjectNode();
      line.put("event", name).put("topic", topic).put("key", key).put("event_id", eventId);
      if (event.has("submission_id")) {
        line.put("submission_id", event.get("submission_id").asText());
      }
      lines.add(line);
    }
    if (records.isEmpty()) {
      return;
    }

    Properties props = new Properties();
    props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args.getOrDefault("--bootstrap-servers", "127.0.0.1:19092"));
    // No partitioner.class: the default partitioner puts a keyed record on
    // murmur2(key bytes) % partitions, the partition trialflow's relay chooses for the same key.
    props.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
    props.put(ProducerConfig.ACKS_CONFIG, "all");
    props.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, "30000");
    props.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, "10000");
    int failed = 0;
    try (KafkaProducer<String, byte[]> producer =
        new KafkaProducer<>(props, new StringSerializer(), new ByteArraySerializer())) {
      List<Future<RecordMetadata>> acks = new ArrayList<>();
      for (ProducerRecord<String, byte[]> r : records) {
        acks.add(producer.send(r));
      }
      producer.flush();
      for (int i = 0; i < acks.size(); i++) {
        try {
          RecordMetadata m = acks.get(i).get();
          lines.get(i).put("partition", m.partition()).put("offset", m.offset());
          System.out.println(json.writeValueAsString(lines.get(i)));
        } catch (Exception e) {
          failed++;
          System.err.println("not acknowledged: " + lines.get(i).get("event").asText() + ": " + e.getMessage());
        }
      }
    }
    if (failed > 0) {
      System.exit(1);
    }
  }

  /** `value` (the example's plain JSON: unions as the bare value or null) as an Avro datum of `schema`. */
  static Object fromJson(Schema schema, JsonNode value, String path) {
    switch (schema.getType()) {
      case RECORD: {
        GenericData.Record record = new GenericData.Record(schema);
        for (Schema.Field field : schema.getFields()) {
          JsonNode v = value.get(field.name());
          if (v == null) {
            throw new IllegalArgumentException(path + "." + field.name() + " is missing");
          }
          record.put(field.name(), fromJson(field.schema(), v, path + "." + field.name()));
        }
        return record;
      }
      case UNION: {
        for (Schema branch : schema.getTypes()) {
          if (fits(branch, value)) {
            return fromJson(branch, value, path);
          }
        }
        throw new IllegalArgumentException(path + ": " + value + " fits no branch of " + schema);
      }
      case ARRAY: {
        List<Object> items = new ArrayList<>();
        Iterator<JsonNode> it = value.elements();
        for (int i = 0; it.hasNext(); i++) {
          items.add(fromJson(schema.getElementType(), it.next(), path + "[" + i + "]"));
        }
        return new GenericData.Array<>(schema, items);
      }
      case ENUM:
        return new GenericData.EnumSymbol(schema, value.asText());
      case STRING:
        return value.asText();
      case INT:
        return value.intValue();
      case LONG:
        return value.longValue();
      case DOUBLE:
        return value.doubleValue();
      case FLOAT:
        return value.floatValue();
      case BOOLEAN:
        return value.booleanValue();
      case NULL:
        return null;
      default:
        throw new IllegalArgumentException(path + ": " + schema.getType() + " is not used by trialflow's schemas");
    }
  }

  static boolean fits(Schema branch, JsonNode v) {
    switch (branch.getType()) {
      case NULL:
        return v.isNull();
      case STRING:
      case ENUM:
        return v.isTextual();
      case INT:
      case LONG:
        return v.isIntegralNumber();
      case DOUBLE:
      case FLOAT:
        return v.isNumber();
      case BOOLEAN:
        return v.isBoolean();
      case ARRAY:
        return v.isArray();
      case RECORD:
      case MAP:
        return v.isObject();
      default:
        return false;
    }
  }

  static Map<String, String> parseArgs(String[] argv) {
    Map<String, String> args = new LinkedHashMap<>();
    for (int i = 0; i < argv.length; i++) {
      String a = argv[i];
      if (a.equals("--new-ids") || a.equals("--print-hex")) {
        args.put(a, "");
      } else if (a.startsWith("--") && i + 1 < argv.length) {
        args.put(a, argv[++i]);
      } else {
        throw new IllegalArgumentException("unexpected argument " + a);
      }
    }
    return args;
  }
}
