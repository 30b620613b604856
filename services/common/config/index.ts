export { ConfigError, loadConfig, type LoadOptions } from "./load.js";
export * from "./schema.js";
