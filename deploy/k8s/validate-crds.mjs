// Validates custom resources against their CRDs' schemas, as shipped by the
// @kubernetes-models npm packages (generated from the projects' own CRD
// definitions: KEDA, the Prometheus Operator). Used by check.py:
//
//   node deploy/k8s/validate-crds.mjs NODE_MODULES_DIR < objects.json
//
// objects.json: a JSON array of [where, object]. Prints one line per
// problem and exits 1 if there is any. These schemas do not reject unknown
// fields (the API server prunes them): check.py checks what the worker
// needs of each object's fields.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const MODELS = {
  "keda.sh/v1alpha1": ["@kubernetes-models/keda/keda.sh/v1alpha1", ["ScaledObject", "TriggerAuthentication"]],
  "monitoring.coreos.com/v1": [
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
    ["ServiceMonitor", "PodMonitor", "PrometheusRule"],
  ],
};

const modules = process.argv[2];
const objects = JSON.parse(readFileSync(0, "utf8"));
let problems = 0;
for (const [where, object] of objects) {
  const what = `${where}: ${object.kind}/${object.metadata?.name}`;
  const [dir, kinds] = MODELS[object.apiVersion] ?? [];
  if (!kinds?.includes(object.kind)) {
    console.log(`${what}: no schema for ${object.apiVersion} ${object.kind}`);
    problems++;
    continue;
  }
  const url = pathToFileURL(join(modules, dir, `${object.kind}.js`)).href;
  const Model = (await import(url))[object.kind];
  try {
    new Model(object).validate();
  } catch (error) {
    console.log(`${what}: ${error.message}`);
    problems++;
  }
}
console.error(`validate-crds: ${objects.length} custom resources, ${problems} problems`);
process.exit(problems ? 1 : 0);
