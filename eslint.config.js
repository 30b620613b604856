// One lint setup for the whole package: typescript-eslint's recommended rules, with `any` banned.
import js from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: ["dist/**", "services/gen/**", "node_modules/**", "runs/**", ".cache/**", ".scratch/**", ".gpu/**", ".gl/**"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      "@typescript-eslint/no-explicit-any": "error",
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
    },
  },
);
