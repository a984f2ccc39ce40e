// The Avro reference implementation's view of our schemas, for the fingerprint test
// (schemas/tests/reference_fingerprints.rs): for each .avsc file given, one line
// `<file> TAB <Parsing Canonical Form> TAB <fingerprint, 8 bytes little-endian, hex>`,
// computed by org.apache.avro.SchemaNormalization — the fingerprint Avro's own
// BinaryMessageEncoder writes in single-object encoding.
//
// Run: java -cp '.tools/interop/java/libs/*' interop/java/Fingerprints.java schemas/avro/*/*.avsc

import java.io.File;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.HexFormat;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;

public class Fingerprints {
    public static void main(String[] files) throws Exception {
        for (String file : files) {
            Schema schema = new Schema.Parser().parse(new File(file));
            long fingerprint = SchemaNormalization.parsingFingerprint64(schema);
            byte[] le = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN).putLong(fingerprint).array();
            System.out.println(file + "\t" + SchemaNormalization.toParsingForm(schema) + "\t" + HexFormat.of().formatHex(le));
        }
    }
}
