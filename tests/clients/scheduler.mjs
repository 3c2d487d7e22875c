// An independent scheduler client, written from protos/ only: no Shepherd code, another language.
// It launches one task through the Launcher and follows the Reconciler's WatchTaskStates until the
// task ends, then prints one JSON line: {"states": [...], "failure": {...}}.
//
// It connects with mutual TLS, presenting a scheduler's client certificate, when given the CA, the
// certificate and the key; with none of them, in plaintext.
//
// Usage: node scheduler.mjs <launcher host:port> <reconciler host:port> <task_id> <pod override YAML>
//                           [<ca.crt> <client.crt> <client.key>]
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [launcherAddr, reconcilerAddr, taskId, override, caFile, certFile, keyFile] = process.argv.slice(2);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../protos");
const definition = protoLoader.loadSync(
  ["shepherd/v1/launcher_service.proto", "shepherd/v1/reconciler_service.proto"],
  { includeDirs: [root], keepCase: true, longs: String, enums: String, defaults: true },
);
const v1 = grpc.loadPackageDefinition(definition).shepherd.v1;
const credentials = caFile
  ? grpc.credentials.createSsl(fs.readFileSync(caFile), fs.readFileSync(keyFile), fs.readFileSync(certFile))
  : grpc.credentials.createInsecure();
const launcher = new v1.LauncherService(launcherAddr, credentials);
const reconciler = new v1.ReconcilerService(reconcilerAddr, credentials);

const key = { dag_id: "node_client", task_id: taskId, run_id: "independent", try_number: 1, map_index: -1 };
const terminal = new Set(["TASK_STATE_SUCCEEDED", "TASK_STATE_FAILED", "TASK_STATE_UP_FOR_RESCHEDULE", "TASK_STATE_REVOKED"]);
const states = [];
const timer = setTimeout(() => { console.error("timed out; states so far:", states); process.exit(2); }, 60000);

const stream = reconciler.WatchTaskStates({ after_cursor: "0" });
stream.on("data", ({ changes }) => changes.forEach(({ task }) => {
  if (task.key.task_id !== taskId || task.key.dag_id !== key.dag_id) return;
  states.push(task.state);
  if (terminal.has(task.state)) {
    clearTimeout(timer);
    console.log(JSON.stringify({ states, failure: task.failure }));
    stream.cancel();
    process.exit(0);
  }
}));
stream.on("error", (err) => { if (err.code !== grpc.status.CANCELLED) { console.error(err); process.exit(3); } });

launcher.LaunchTask({ key, command: ["run"], pod_override_yaml: override }, (err, reply) => {
  if (err) { console.error("LaunchTask failed:", err.message); process.exit(4); }
  if (reply.launch.state !== "LAUNCH_STATE_ACCEPTED") { console.error("unexpected launch", reply); process.exit(5); }
});
