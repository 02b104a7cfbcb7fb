// Validates custom resources against their CRDs' schemas, as the
// @kubernetes-models npm packages ship them (generated from KEDA's and the
// Prometheus Operator's CRDs; they do not reject unknown fields, the API
// server prunes them). check.py pipes in a JSON array of [where, object]:
//
//   node deploy/k8s/validate-crds.mjs NODE_MODULES_DIR < objects.json
//
// One line per problem on stdout, exit status 1 if any.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const MODELS = {
  "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};
const objects = JSON.parse(readFileSync(0, "utf8"));
let problems = 0;
for (const [where, object] of objects) {
  try {
    const dir = MODELS[object.apiVersion] ?? `(no schema for ${object.apiVersion})`;
    const Model = (await import(pathToFileURL(join(process.argv[2], dir, `${object.kind}.js`)).href))[object.kind];
    new Model(object).validate();
  } catch (error) {
    console.log(`${where}: ${object.kind}/${object.metadata?.name}: ${error.message}`);
    problems++;
  }
}
console.error(`validate-crds: ${objects.length} custom resources, ${problems} problems`);
process.exit(problems ? 1 : 0);
